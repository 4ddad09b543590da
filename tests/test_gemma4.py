"""Gemma 4 end to end: tiny checkpoints with the real Gemma 4 vocabulary (tests/tiny_gemma4.py),
converted by ``gemma convert`` to GGUF and MLX and checked against transformers, then chatted
with, thinking on, through both backends, the CLI and the server.

The dense checkpoint has the E-models' per-layer embeddings and KV-shared layers; the MoE one
has the 26B-A4B's routed experts beside a dense MLP and K = V on its global layers. Both are
trained on thinking chats too, so they really open, fill and close their thought channel.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

from conftest import run_gemma  # noqa: E402
from gemma4_data import vocab_gguf  # noqa: E402
from tiny_gemma4 import (  # noqa: E402
    SLIDING_WINDOW,
    build_gemma4,
    reference_logits,
    training_text,
)

from gemma_chat import template4  # noqa: E402
from gemma_chat.backends import load_backend  # noqa: E402
from gemma_chat.backends.base import SamplingParams  # noqa: E402
from gemma_chat.chat import Conversation  # noqa: E402
from gemma_chat.convert.check import llama_cpp_logits, mlx_logits  # noqa: E402
from gemma_chat.loader import LoadOptions  # noqa: E402
from gemma_chat.resolve import resolve  # noqa: E402

N_POSITIONS = 80  # five sliding windows
GREEDY = SamplingParams(temperature=0, max_tokens=60)
QUESTIONS = ["The cat sat on the mat.", "What is the weather like today?", "Tell me a story."]


_BUILT: dict[str, Path] = {}


def built(kind: str, tmp_path_factory) -> Path:
    """The tiny checkpoint of ``kind``, built once per test session."""
    if kind not in _BUILT:
        root = tmp_path_factory.mktemp(f"gemma4-{kind}")
        _BUILT[kind] = build_gemma4(root / f"tiny-gemma4-{kind}", vocab_gguf=vocab_gguf(),
                                    moe=kind == "moe", chats=True, train_steps=300)
    return _BUILT[kind]


@pytest.fixture(scope="module", params=["dense", "moe"])
def tiny(request, tmp_path_factory):
    from tokenizers import Tokenizer

    folder = built(request.param, tmp_path_factory)
    root = folder.parent
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = [2] + tokenizer.encode("\n".join(training_text()), add_special_tokens=False).ids
    ids = ids[:N_POSITIONS]
    assert len(ids) == N_POSITIONS > 4 * SLIDING_WINDOW
    return SimpleNamespace(kind=request.param, folder=folder, root=root, ids=ids,
                           reference=reference_logits(folder, ids), converted={})


def chat_model(kind: str, tmp_path_factory) -> SimpleNamespace:
    """A thinking-trained tiny model as Q8_0 GGUF and 8-bit MLX."""
    folder = built(kind, tmp_path_factory)
    root = folder.parent
    return SimpleNamespace(kind=kind, folder=folder, gguf=convert(folder, root, "gguf", "q8"),
                           mlx=convert(folder, root, "mlx", "q8"))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return chat_model("dense", tmp_path_factory)


@pytest.fixture(scope="module", params=["dense", "moe"])
def thinker(request, tmp_path_factory):
    return chat_model(request.param, tmp_path_factory)


def convert(folder: Path, root: Path, to: str, quant: str) -> Path:
    out = root / f"{to}-{quant}"
    if not out.exists():
        result = run_gemma("convert", str(folder), "--to", to, "--quant", quant, "--out",
                           str(out), timeout=300)
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stderr
    return next(out.glob("*.gguf")) if to == "gguf" else out


def check(reference: np.ndarray, got: np.ndarray, quant: str, kind: str = "dense") -> str:
    scale = np.abs(reference).max()
    diff = np.abs(got - reference).max()
    agree = float((got.argmax(-1) == reference.argmax(-1)).mean())
    summary = (f"{kind} {quant}: max|diff| {diff / scale:.2e} of max|logit| {scale:.1f}, "
               f"top-1 {agree:.3f}")
    print(summary)
    if kind == "moe":
        # A top-2 router over 8 tiny experts has near-ties (probabilities 1e-6 to 3e-4 apart)
        # that engines summing in another order break the other way; from there the logits
        # differ by whole units. Agreement, not the largest difference, is what holds.
        assert agree >= {"f32": 0.9, "f16": 0.9, "q8_0": 0.85, "q8": 0.85}.get(quant, 0.7), \
            summary
        return summary
    if quant == "f32":
        # llama.cpp's f32 path on Gemma 4 (soft-capping, proportional RoPE through rope_freqs,
        # per-layer inputs): 1.2e-3 measured, against 1e-3 for Gemma 1-3.
        assert diff <= 2.5e-3 * scale and agree >= 0.98, summary
    elif quant == "f16":
        assert diff <= 5e-3 * scale, summary
    elif quant in ("q8_0", "q8"):
        assert agree >= 0.95, summary
    else:
        assert agree >= 0.80, summary
    return summary


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_k_m"])
def test_gguf_logits_match_transformers(tiny, quant):
    key = ("gguf", quant)
    if key not in tiny.converted:
        tiny.converted[key] = convert(tiny.folder, tiny.root, "gguf", quant)
    check(tiny.reference, llama_cpp_logits(tiny.converted[key], tiny.ids), quant, tiny.kind)


@pytest.mark.parametrize("quant", ["f32", "q8"])
def test_mlx_logits_match_transformers(tiny, quant):
    pytest.importorskip("mlx_lm")
    folder = convert(tiny.folder, tiny.root, "mlx", quant)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma4_text" and config["global_head_dim"] == 64
    check(tiny.reference, mlx_logits(folder, tiny.ids), quant, tiny.kind)


def _history_messages(convo: Conversation, pending: str) -> list[dict]:
    messages = []
    for ex in convo.exchanges[:-1]:
        messages += [{"role": "user", "content": ex.user},
                     {"role": "assistant", "content": ex.reply}]
    return messages + [{"role": "user", "content": pending}]


@pytest.mark.parametrize("engine", ["llama.cpp", "mlx"])
def test_a_thinking_chat(thinker, engine):
    """Thoughts come apart from the answer, the next prompt is the official template's
    rendering (thoughts stripped), and a turn evaluates only the previous answer, the closing
    and the new user turn, on both backends."""
    if engine == "mlx":
        pytest.importorskip("mlx_lm")
    path = thinker.gguf if engine == "llama.cpp" else thinker.mlx
    backend = load_backend(resolve(str(path)), engine, LoadOptions(n_ctx=1024))
    try:
        assert backend.info.architecture == "gemma4"
        convo = Conversation(backend, thinking=True)
        prompts = convo.prompts
        assert prompts.can_think and prompts.format.revision == "release"  # the file's own
        for i, question in enumerate(QUESTIONS):
            chunks = list(convo.send(question, GREEDY))
            ex, stats = convo.exchanges[-1], convo.last_stats
            assert stats.stop_reason == "stop" and stats.thought_tokens > 3
            assert ex.thoughts.startswith("The user asks about") and ex.reply.strip()
            assert ex.thoughts not in ex.reply
            answer_text = "".join(c.text for c in chunks if not c.thought)
            assert answer_text == ex.reply and "I will answer" not in answer_text
            sent = prompts.tokens(template4.parts(_history_messages(convo, question),
                                                  thinking=True, revision="release"))
            assert stats.prompt_tokens == len(sent)
            assert "I will answer" not in backend.detokenize(sent)
            if i:
                previous = convo.exchanges[-2]
                answer = backend.tokenize(template4.strip_thinking(previous.reply),
                                          special=False)
                turn = prompts.user_turn(question, first=False, thinking=True)
                assert stats.prompt_eval_tokens == len(answer) + len(prompts.closing) + \
                    len(turn), stats
    finally:
        backend.close()
    # That both backends write the same, token for token, is checked unquantized in
    # test_mlx_trims_a_wrapped_sliding_window_cache: Q8_0 and 8-bit MLX round differently, and
    # a near-tie in this tiny model's first thought breaks one way on one CPU and the other
    # way on another.


def test_chat_command_shows_thoughts_apart(dense, tmp_path):
    env = {"GEMMA_HOME": str(tmp_path / "home")}
    result = run_gemma("chat", "-m", str(dense.gguf), "--think", "--temp", "0", "-n", "60",
                       "--plain", input="The cat sat on the mat.\n", env=env)
    assert result.returncode == 0, result.stderr
    assert "The user asks about" not in result.stdout and result.stdout.strip()
    assert "[thinking] The user asks about" in result.stderr
    assert "thought for" in result.stderr and "thinking on" in result.stderr
    hidden = run_gemma("chat", "-m", str(dense.gguf), "--think", "--hide-thinking", "--temp",
                       "0", "-n", "60", "--plain", input="The cat sat on the mat.\n", env=env)
    assert hidden.stdout == result.stdout
    assert "The user asks about" not in hidden.stderr and "thought for" in hidden.stderr
    saved = sorted((tmp_path / "home" / "conversations").glob("*.jsonl"))[0]
    events = [json.loads(line) for line in saved.read_text().splitlines()]
    assert events[0]["thinking"] is True
    assert events[1]["thoughts"].startswith("The user asks about")
    assert "The user asks about" not in events[1]["reply"]


def test_run_json_keeps_thoughts_apart(dense):
    result = run_gemma("run", "-m", str(dense.gguf), "--think", "--temp", "0", "-n", "60",
                       "--json", "Tell me a story.")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["thinking"] is True
    assert record["thoughts"].startswith("The user asks about")
    assert record["text"].strip() and "The user asks about" not in record["text"]
    assert record["stats"]["thought_tokens"] > 3
    refused = run_gemma("run", "-m", str(dense.gguf), "--think", "--raw", "Hi")
    assert refused.returncode == 2 and "needs the chat template" in refused.stderr


def test_server_sends_reasoning_content_to_the_openai_client(dense):
    import openai
    from conftest import serving

    from gemma_chat.server import create_app

    backend = load_backend(resolve(str(dense.gguf)), "llama.cpp", LoadOptions(n_ctx=1024))
    try:
        with serving(create_app(backend, ["tiny-gemma4"])) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x",
                                   max_retries=0, timeout=120)
            messages = [{"role": "user", "content": "Tell me a story."}]
            reply = client.chat.completions.create(
                model="tiny-gemma4", messages=messages, temperature=0, max_tokens=60,
                extra_body={"chat_template_kwargs": {"enable_thinking": True}})
            message = reply.choices[0].message
            assert message.reasoning_content.startswith("The user asks about")
            assert message.content.strip() and "The user asks about" not in message.content
            stream = client.chat.completions.create(
                model="tiny-gemma4", messages=messages, temperature=0, max_tokens=60, stream=True,
                reasoning_effort="high")
            thoughts, text = [], []
            for chunk in stream:
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    thoughts.append(getattr(delta, "reasoning_content", None) or "")
                    text.append(delta.content or "")
            assert "".join(thoughts) == message.reasoning_content
            assert "".join(text) == message.content
            # Thinking off (the default): no reasoning_content, the answer straight away.
            plain = client.chat.completions.create(model="tiny-gemma4", messages=messages,
                                                   temperature=0, max_tokens=30)
            assert getattr(plain.choices[0].message, "reasoning_content", None) is None
    finally:
        backend.close()


def test_mlx_trims_a_wrapped_sliding_window_cache(dense, monkeypatch):
    """Past its window plus slack, MLX's rotating cache has wrapped; rolling back over the last
    reply's thoughts still trims it (the window before the new end is held) instead of
    re-evaluating, and the replies stay those of llama.cpp, token for token (both unquantized:
    the quantized ones round differently, and near-ties break apart)."""
    pytest.importorskip("mlx_lm")
    from gemma_chat.backends import mlx as mlx_backend

    # Window 16 + slack 48: the caches wrap after 64 tokens, and a roll-back of up to 48
    # tokens (these replies are 20-36 with their thoughts) still trims them.
    monkeypatch.setattr(mlx_backend, "SWA_SLACK", 48)
    questions = QUESTIONS + ["Once upon a time there was a king.", "Where is the station?"]
    runs = {}
    root = dense.folder.parent
    for engine, path in (("llama.cpp", convert(dense.folder, root, "gguf", "f32")),
                         ("mlx", convert(dense.folder, root, "mlx", "f32"))):
        backend = load_backend(resolve(str(path)), engine, LoadOptions(n_ctx=1024))
        try:
            convo = Conversation(backend, thinking=True)
            evaluated, trimmed_wrapped = [], []
            for question in questions:
                wrapped = engine == "mlx" and any(
                    getattr(c, "window", None) and c.offset > c.max_size
                    for c in backend._cache)
                list(convo.send(question, GREEDY))
                stats = convo.last_stats
                evaluated.append(stats.prompt_eval_tokens)
                if wrapped and stats.prompt_eval_tokens < stats.prompt_tokens:
                    trimmed_wrapped.append(len(evaluated) - 1)
            runs[engine] = ([(ex.thoughts, ex.reply) for ex in convo.exchanges], evaluated,
                            trimmed_wrapped)
        finally:
            backend.close()
    replies, evaluated, trimmed = runs["mlx"]
    assert replies == runs["llama.cpp"][0]
    assert len(trimmed) >= 2, evaluated
    for turn in trimmed:  # as little as llama.cpp, which keeps the whole context
        assert evaluated[turn] == runs["llama.cpp"][1][turn]


def test_memory_estimate_is_what_llama_cpp_allocates(tiny):
    """Sliding window + micro-batch, global layers the whole context, none for KV-shared
    layers, V even where K = V: what llama.cpp allocates."""
    from conftest import assert_llama_cpp_cache_is_estimated

    key = ("gguf", "f32")
    if key not in tiny.converted:
        tiny.converted[key] = convert(tiny.folder, tiny.root, "gguf", "f32")
    assert_llama_cpp_cache_is_estimated(tiny.converted[key])


def test_gguf_to_mlx_matches_transformers(dense, tmp_path):
    """A Gemma 4 GGUF (Q8_0) imported to MLX: the names, the config rebuilt from the per-layer
    metadata, the tokenizer rebuilt from the GGUF's BPE keys."""
    pytest.importorskip("mlx_lm")
    from tokenizers import Tokenizer

    out = tmp_path / "from-gguf"
    result = run_gemma("convert", str(dense.gguf), "--to", "mlx", "--quant", "f32", "--out",
                       str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4_text" and config["num_kv_shared_layers"] == 3
    ours, theirs = (Tokenizer.from_file(str(f / "tokenizer.json")) for f in (out, dense.folder))
    for text in ["<|turn>user\nHi<turn|>", "  spaces\tand 日本語 🦙", '<|"|>x<|"|> <mask>']:
        assert ours.encode(text).ids == theirs.encode(text).ids
    ids = [2] + theirs.encode("\n".join(training_text()), add_special_tokens=False).ids
    ids = ids[:N_POSITIONS]
    check(reference_logits(dense.folder, ids), mlx_logits(out, ids), "q8")


def test_memory_estimate_is_what_mlx_allocates(dense, monkeypatch):
    pytest.importorskip("mlx_lm")
    from conftest import assert_mlx_cache_is_estimated

    assert_mlx_cache_is_estimated(dense.mlx, monkeypatch)


@pytest.mark.parametrize("engine", ["llama.cpp", "mlx"])
def test_openai_client_gets_valid_tool_calls_from_gemma4(dense, engine):
    """The tiny Gemma 4 was never taught to call tools: its calls parse and fit the declared
    parameters because the call grammar holds them there (required, then a named tool); the
    tool's result goes back in Gemma 4's own turns and the model answers."""
    import openai
    from conftest import serving
    from test_tool_grammar import BOOK, SCHEMAS

    from gemma_chat.server import create_app

    jsonschema = pytest.importorskip("jsonschema")
    path = dense.gguf if engine == "llama.cpp" else dense.mlx
    backend = load_backend(resolve(str(path)), engine, LoadOptions(n_ctx=1024))
    # Strings bounded: a model that was never taught to close a string would not, but a
    # call still has to parse within the length limit.
    weather = {"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}}
    schemas = {**SCHEMAS, "get_weather": weather["function"]["parameters"]}
    tools = [weather, BOOK]
    try:
        with serving(create_app(backend, ["tiny-gemma4"])) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                   timeout=300)
            messages = [{"role": "user", "content": "Book a table for two at 18:00, and "
                                                    "what is the weather in Oslo?"}]
            for seed, choice in enumerate(["required", "required",
                                           {"type": "function", "function": {"name": "book"}}]):
                reply = client.chat.completions.create(
                    model="tiny-gemma4", messages=messages, tools=tools, tool_choice=choice,
                    seed=seed, max_tokens=120)
                message = reply.choices[0].message
                assert reply.choices[0].finish_reason == "tool_calls", message
                for call in message.tool_calls:
                    jsonschema.validate(json.loads(call.function.arguments),
                                        schemas[call.function.name])
            assert call.function.name == "book"  # the named choice
            messages += [message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id,
                          "content": json.dumps({"booked": True, "table": 7})}]
            final = client.chat.completions.create(model="tiny-gemma4", messages=messages,
                                                   tools=tools, max_tokens=40, temperature=0)
            assert final.usage.prompt_tokens > reply.usage.prompt_tokens + 10
            answer = final.choices[0].message
            assert answer.content or answer.tool_calls
            for call in answer.tool_calls or []:  # auto: the model may call again, validly
                jsonschema.validate(json.loads(call.function.arguments),
                                    schemas[call.function.name])
    finally:
        backend.close()


def test_a_gemma4_chat_calls_a_tool_and_keeps_it(dense):
    """`gemma chat --tools` on Gemma 4, in process: a required call (constrained, so it fits the
    tool's parameters) is answered, the model goes on, and the next prompt carries the call and
    its result in Gemma 4's own syntax, with one BOS."""
    jsonschema = pytest.importorskip("jsonschema")
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}}
    backend = load_backend(resolve(str(dense.gguf)), "llama.cpp", LoadOptions(n_ctx=1024))
    try:
        convo = Conversation(backend, tools=[weather])
        seen = []

        def run_calls(calls):
            seen.extend(calls)
            return [{"role": "tool", "tool_call_id": c["id"], "name": "get_weather",
                     "content": "12 degrees and sunny"} for c in calls]

        chunks = list(convo.send("Weather in Oslo?", SamplingParams(seed=1, max_tokens=40),
                                 run_calls=run_calls, tool_choice="required"))
        assert seen and chunks[-1].stats is not None
        for call in seen:
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                weather["function"]["parameters"])
        # The call's own tokens are not shown as text.
        assert "call:get_weather" not in "".join(c.text for c in chunks)
        [exchange] = convo.exchanges
        assert exchange.calls[0]["tool_calls"][0]["function"]["name"] == "get_weather"
        prompt = backend.detokenize(convo.ids_for(convo.exchanges, "Thanks"), special=True)
        assert prompt.count("<bos>") == 1 and "12 degrees and sunny" in prompt
        assert "<|tool_call>call:get_weather{" in prompt and "<|tool>" in prompt
    finally:
        backend.close()


def test_a_thinking_chat_through_a_server(dense):
    """`gemma serve` on the tiny Gemma 4 and the chat through the remote backend: the thinking
    switch reaches the server, thoughts come back in ``reasoning_content`` and are kept apart,
    greedy, exactly as the local backend has them, turn after turn."""
    from conftest import serving

    from gemma_chat.backends.remote import RemoteBackend
    from gemma_chat.server import create_app

    local = load_backend(resolve(str(dense.gguf)), "llama.cpp", LoadOptions(n_ctx=1024))
    served = load_backend(resolve(str(dense.gguf)), "llama.cpp", LoadOptions(n_ctx=1024))
    try:
        with serving(create_app(served, ["tiny-gemma4"])) as url:
            near = Conversation(local, thinking=True)
            far = Conversation(RemoteBackend(url), thinking=True)
            for question in QUESTIONS[:2]:
                list(near.send(question, GREEDY))
                chunks = list(far.send(question, GREEDY))
                mine, theirs = near.exchanges[-1], far.exchanges[-1]
                assert theirs.thoughts.startswith("The user asks about")
                assert (theirs.thoughts, theirs.reply) == (mine.thoughts, mine.reply)
                assert "".join(c.text for c in chunks if c.thought) == mine.thoughts
                assert far.last_stats.prompt_tokens == near.last_stats.prompt_tokens
                assert far.last_stats.thought_tokens > 3
            far.set_thinking(False)
            list(far.send(QUESTIONS[2], GREEDY))
            assert not far.exchanges[-1].thoughts  # the switch went off at the server too
    finally:
        local.close()
        served.close()


def test_thoughts_in_the_chat_page(dense, tmp_path, monkeypatch):
    """The chat page in a real Chromium on the tiny Gemma 4: with "Think first" ticked, the
    thoughts stream into a collapsed block of their own and the answer below it, as the local
    backend has them; the stored conversation keeps them apart."""
    import time

    from conftest import chat_page

    from gemma_chat import sessions

    monkeypatch.setenv("GEMMA_HOME", str(tmp_path / "home"))
    backend = load_backend(resolve(str(dense.gguf)), "llama.cpp", LoadOptions(n_ctx=1024))
    try:
        local = Conversation(backend, thinking=True)
        list(local.send(QUESTIONS[0], GREEDY))
        expected = local.exchanges[-1]
        assert expected.thoughts.startswith("The user asks about")
        with chat_page(backend, ["tiny-gemma4"]) as page:
            assert page.locator("#thinking-label").is_visible()  # a model that thinks
            page.fill("#temperature", "0")
            page.fill("#max_tokens", str(GREEDY.max_tokens))
            page.check("#thinking")
            page.fill("#input", QUESTIONS[0])
            page.press("#input", "Enter")
            deadline = time.time() + 60
            while page.locator(".msg.assistant .tools").count() < 1:
                assert time.time() < deadline
                time.sleep(0.1)
            details = page.locator("details.thoughts").first
            assert details.get_attribute("open") is None  # collapsed
            assert details.locator("div").text_content() == expected.thoughts
            answer = page.locator(".msg.assistant .body").first.inner_text()
            assert answer.split() == expected.reply.split()
        [path] = sessions.recent()
        stored = sessions.load(path).exchanges[0]
        assert (stored.thoughts, stored.reply) == (expected.thoughts, expected.reply)
    finally:
        backend.close()
