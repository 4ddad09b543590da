"""One prompt in, one streamed answer out: what ``gemma run`` does, as plain functions.

    backend = load_backend(resolve("gemma-3-270m"))
    ids = prompt_ids(backend, "The capital of France is", chat=False)
    text, stats = generate(backend, ids, SamplingParams(temperature=0), sys.stdout.write)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

from .backends.base import Backend, Chunk, SamplingParams, Stats, apply_model_defaults, collect
from .errors import InvalidArgument
from .prompt import PromptBuilder, media_content
from .template import MediaPart
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
               thinking: bool = False, media: Sequence = ()) -> list[int]:
    """Token ids for ``text``: in the model's chat format when ``chat`` (with thinking on when
    ``thinking``), else as raw text; ``media`` (pictures, clips) come before the text.

    Either way the ids hold exactly one BOS.
    """
    prompts = PromptBuilder(backend)
    if system:
        valid_text(system, "the system prompt")
    if chat:
        messages = [{"role": "user", "content": media_content(media, text) if media else text}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return prompts.chat(messages, thinking=thinking)
    if system:
        raise InvalidArgument("--system needs the chat template (drop --raw, or use an IT model)")
    ids = prompts.raw(text)
    if media:  # a pretrained model: each picture on its own lines after the BOS
        ids[1:1] = prompts.tokens([p for m in media for p in
                                   ("\n\n", MediaPart(m.kind, m), "\n\n")])
    return ids


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


def generate_messages(backend, messages: Sequence[dict], sampling: SamplingParams,
                      write: Callable[[str], object], *, thinking: bool | None = None,
                      thoughts: Callable[[object], object] | None = None,
                      response_format: dict | None = None) -> tuple[str, Stats]:
    """:func:`generate` for a model on a server (:mod:`gemma_chat.backends.remote`): the
    messages go as they are and the server renders them."""
    chunks = backend.chat(messages, sampling, thinking=thinking, response_format=response_format)
    if thoughts is not None:
        chunks = _tap_thoughts(chunks, thoughts)
    return collect(chunks, write)


def _tap_thoughts(chunks, thoughts):
    for chunk in chunks:
        if chunk.thought:
            thoughts(chunk)
        yield chunk


#: Model turns one answer may take with tools before it must answer in text.
MAX_TOOL_ROUNDS = 8


def tool_turns(backend: Backend, prompts: PromptBuilder, messages: list[dict],
               declared: Sequence[dict], sampling: SamplingParams, *,
               run_calls: Callable[[list[dict]], list[dict]], choice: str = "auto",
               thinking: bool = False) -> Iterator[Chunk]:
    """Stream the model's turns answering the last of ``messages`` with the tools
    ``declared``: after a turn with calls, ``run_calls(calls)`` gives the ``tool`` messages
    with their results and the model goes on, until it answers in text. Chunks of every turn
    come out (thoughts marked; a Gemma 4 call's own tokens with no text); ``messages`` gains
    each finished turn. ``choice`` (``auto``, ``required`` or a tool's name) holds for the
    first turn; calls are constrained as :func:`~gemma_chat.tools.plan_calls` says."""
    from .template4 import END_TOOL_CALL, TOOL_CALL
    from .tools import ToolRequest, plan_calls, read_calls

    gemma4 = prompts.format.name == "gemma4"
    call_marks = (prompts.tokens([TOOL_CALL])[0], prompts.tokens([END_TOOL_CALL])[0]) \
        if gemma4 else None
    grammars: dict[str, object] = {}

    def compile(key, build):
        if key not in grammars:
            grammars[key] = build()
        return grammars[key]

    for round_ in range(MAX_TOOL_ROUNDS):
        first = choice if round_ == 0 else "auto"
        request = ToolRequest(list(declared), "auto" if first == "auto" else "required",
                              None if first in ("auto", "required") else first)
        plan = plan_calls(backend, prompts, request, compile)
        ids = prompts.with_tools(messages, declared, thinking=thinking) + \
            prompts.tokens(plan.prefix)
        stream = split_thoughts(backend.stream(ids, sampling, constraint=plan.constraint),
                                prompts.thought_ids)
        pieces, stats = [], None
        for chunk in _quiet_calls(stream, call_marks, bool(plan.prefix)):
            if not chunk.thought:
                pieces.append(chunk.text)
            stats = chunk.stats or stats
            yield chunk
        text = "".join(pieces)
        full = plan.forced + backend.detokenize(stats.token_ids, special=True) \
            if gemma4 and stats is not None else text
        calls, rest = read_calls(full, request, gemma4, known_only=False)
        if not calls:
            messages.append({"role": "assistant", "content": text})
            return
        messages.append({"role": "assistant", "content": rest, "tool_calls": [
            {**call, "function": {"name": call["function"]["name"],
                                  "arguments": json.loads(call["function"]["arguments"])}}
            for call in calls]})
        messages += run_calls(calls)
    raise InvalidArgument(f"the model still called tools after {MAX_TOOL_ROUNDS} turns; "
                          "stopped")


def _quiet_calls(chunks: Iterator[Chunk], marks: tuple[int, int] | None,
                 inside: bool) -> Iterator[Chunk]:
    """The chunks, with no text from a Gemma 4 call's opening to its close: a call is shown
    as the call it is, not as the model spells it."""
    for chunk in chunks:
        if marks is not None and marks[0] in chunk.token_ids:
            inside = True
        if inside:
            if marks is not None and marks[1] in chunk.token_ids:
                inside = False
            chunk = replace(chunk, text="")
        yield chunk


def answer_with_tools(backend: Backend, messages: list[dict], tools: Sequence, sampling:
                      SamplingParams, *, choice: str = "auto", thinking: bool = False,
                      confirm: Callable[[str, dict], bool], note: Callable[[str], object],
                      timeout: float = 30.0) -> tuple[str, Stats]:
    """Answer the last user message, calling ``tools`` (:class:`~gemma_chat.local_tools.
    LocalTool`) as the model asks: each call is shown (``note``) and run only if ``confirm``
    says so, its result (or why it failed) goes back to the model, until it answers in text.
    Returns the answer and the last turn's stats; ``messages`` gains the turns."""
    from .local_tools import run_calls

    stats = None
    turns = tool_turns(backend, PromptBuilder(backend), messages,
                       [t.declaration() for t in tools], sampling, choice=choice,
                       thinking=thinking,
                       run_calls=lambda calls: run_calls(calls, tools, confirm, note, timeout))
    for chunk in turns:
        stats = chunk.stats or stats
    return messages[-1]["content"], stats
