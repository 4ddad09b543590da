"""One prompt in, one streamed answer out: what ``gemma run`` does, as plain functions.

    backend = load_backend(resolve("gemma-3-270m"))
    ids = prompt_ids(backend, "The capital of France is", chat=False)
    text, stats = generate(backend, ids, SamplingParams(temperature=0), sys.stdout.write)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from .backends.base import Backend, SamplingParams, Stats, apply_model_defaults, collect
from .errors import InvalidArgument
from .prompt import PromptBuilder
from .thinking import split_thoughts

#: A pretrained (base) model never ends its turn on its own: without --max-tokens, stop here.
PT_DEFAULT_MAX_TOKENS = 256


def compose(prompt: str | None, stdin_text: str | None) -> str:
    """The prompt argument, then a blank line, then stdin (either may be missing)."""
    parts = [p for p in (prompt, stdin_text) if p is not None and p.strip()]
    text = "\n\n".join(p.strip("\n") if i else p for i, p in enumerate(parts))
    if not text.strip():
        raise InvalidArgument("the prompt is empty: give it as an argument or on stdin")
    return valid_text(text, "the prompt")


def valid_text(text: str, what: str) -> str:
    """``text``, refused when it holds bytes that are not UTF-8 (Python keeps them from a
    command line as lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{what} is not valid UTF-8 text (byte {exc.start})") from None
    return text


def thinking_mode(prompts: PromptBuilder, think: bool | None, *, chat: bool) -> bool:
    """Whether to think: ``--think``/``--no-think``, else the model's default (off). Asking a
    model without a thinking mode to think, or to think on a raw prompt, is an error."""
    if think and not prompts.can_think:
        raise InvalidArgument(f"{prompts.backend.info.name} has no thinking mode (Gemma 4 "
                              "models think); drop --think")
    if think and not chat:
        raise InvalidArgument("--think needs the chat template (drop --raw)")
    return bool(think)


def prompt_ids(backend: Backend, text: str, *, chat: bool, system: str | None = None,
               thinking: bool = False) -> list[int]:
    """Token ids for ``text``: in the model's chat format when ``chat`` (with thinking on when
    ``thinking``), else as raw text.

    Either way the ids hold exactly one BOS.
    """
    prompts = PromptBuilder(backend)
    if system:
        valid_text(system, "the system prompt")
    if chat:
        messages = [{"role": "user", "content": text}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return prompts.chat(messages, thinking=thinking)
    if system:
        raise InvalidArgument("--system needs the chat template (drop --raw, or use an IT model)")
    return prompts.raw(text)


def default_sampling(backend: Backend, *, capped: bool, **overrides: object) -> SamplingParams:
    """Gemma's defaults, then the model's own generation config, then the user's flags.

    ``capped``: a pretrained model or a raw prompt, which rarely stops on its own; without
    ``max_tokens`` it stops after :data:`PT_DEFAULT_MAX_TOKENS`.
    """
    base = apply_model_defaults(SamplingParams(), backend.info.sampling_defaults)
    if capped and overrides.get("max_tokens") is None:
        overrides["max_tokens"] = PT_DEFAULT_MAX_TOKENS
    try:
        return base.with_overrides(**overrides)
    except TypeError as exc:  # an unknown override name is a programming error
        raise InvalidArgument(str(exc)) from None


def check_overrides(overrides: dict[str, object]) -> None:
    """Validate sampling flags before a model is loaded (raises :class:`InvalidArgument`)."""
    SamplingParams().with_overrides(**overrides)


def generate(
    backend: Backend,
    ids: Sequence[int],
    sampling: SamplingParams,
    write: Callable[[str], object],
    *,
    thought_ids: tuple[int, int] | None = None,
    thoughts: Callable[[object], object] | None = None,
    **options: object,
) -> tuple[str, Stats]:
    """Stream a generation into ``write``; return the answer text and the stats. With
    ``thought_ids`` (a thinking model's channel markers) the thoughts are kept out of the
    answer and each thought chunk goes to ``thoughts``."""
    chunks = split_thoughts(backend.stream(ids, sampling, **options), thought_ids)
    if thoughts is not None:
        chunks = _tap_thoughts(chunks, thoughts)
    return collect(chunks, write)


def _tap_thoughts(chunks, thoughts):
    for chunk in chunks:
        if chunk.thought:
            thoughts(chunk)
        yield chunk


#: Model turns one `--tools` answer may take before it must answer in text.
MAX_TOOL_ROUNDS = 8


def answer_with_tools(backend: Backend, messages: list[dict], tools: Sequence, sampling:
                      SamplingParams, *, choice: str = "auto", thinking: bool = False,
                      confirm: Callable[[str, dict], bool], note: Callable[[str], object],
                      timeout: float = 30.0) -> tuple[str, Stats]:
    """Answer the last user message, calling ``tools`` (:class:`~gemma_chat.local_tools.
    LocalTool`) as the model asks: each call is shown (``note``) and run only if ``confirm``
    says so, its result (or why it failed) goes back to the model, until it answers in text.
    ``choice`` is ``auto``, ``required`` or a tool's name, for the first turn only. Returns
    the answer and the last turn's stats; ``messages`` gains the turns."""
    from .local_tools import ToolFailed
    from .structured import json_constraint
    from .template4 import TOOL_CALL
    from .tools import ToolRequest, gemma3_call_schema, gemma3_messages, read_calls

    prompts = PromptBuilder(backend)
    gemma4 = prompts.format.name == "gemma4"
    declared = [t.declaration() for t in tools]
    by_name = {t.name: t for t in tools}
    name = choice if choice not in ("auto", "required") else None
    for round_ in range(MAX_TOOL_ROUNDS):
        forced, options = "", {}
        if gemma4:
            ids = prompts.chat(messages, thinking=thinking, tools=declared)
        else:
            ids = prompts.chat(gemma3_messages(messages, declared))
        if round_ == 0 and choice != "auto":
            if gemma4:
                forced = "call:" + (f"{name}{{" if name else "")
                ids += prompts.tokens([TOOL_CALL, forced])
                forced = str(TOOL_CALL) + forced
            else:
                options["constraint"] = json_constraint(
                    backend, gemma3_call_schema(declared, name))
        text, stats = generate(backend, ids, sampling, lambda _: None,
                               thought_ids=prompts.thought_ids, **options)
        full = forced + backend.detokenize(stats.token_ids, special=True) if gemma4 else text
        request = ToolRequest(declared, "auto")
        calls, rest = read_calls(full, request, gemma4)
        if not calls:
            messages.append({"role": "assistant", "content": text})
            return text, stats
        turn = {"role": "assistant", "content": rest, "tool_calls": []}
        results = []
        for call in calls:
            function = call["function"]
            args = json.loads(function["arguments"])
            turn["tool_calls"].append({"id": call["id"], "type": "function",
                                       "function": {"name": function["name"],
                                                    "arguments": args}})
            shown = f"{function['name']}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
            tool = by_name[function["name"]]
            if not confirm(shown, args):
                result = "The user declined to run this tool."
                note(f"not run: {shown}")
            else:
                try:
                    result = tool.call(tool.check(args), timeout=timeout)
                    note(f"ran {shown} -> {result[:200]}")
                except ToolFailed as exc:
                    result = f"error: {exc}"
                    note(f"failed: {exc}")
            results.append({"role": "tool", "tool_call_id": call["id"],
                            "name": function["name"], "content": result})
        messages += [turn, *results]
    raise InvalidArgument(f"the model still called tools after {MAX_TOOL_ROUNDS} turns; "
                          "stopped")
