"""The MLX backend on tiny random-weight Gemma, Gemma 2 and Gemma 3 checkpoints, for real
(mlx[cpu] on Linux): each built in the test with the real config shape scaled down and a real
BPE tokenizer trained in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from gemma_chat.backends import load_backend  # noqa: E402
from gemma_chat.backends.base import SamplingParams  # noqa: E402
from gemma_chat.chat import Conversation  # noqa: E402
from gemma_chat.resolve import resolve  # noqa: E402
from gemma_chat.template import render  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
TEXT = ["The river runs to the sea and back again.", "Water boils at one hundred degrees.",
        "user model hello there, how are you today?", "Gemma is a family of open models.",
        "Numbers 0123456789, tabs\tand  spaces, café, 日本語."] * 20

ARGS = {
    "gemma": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=2, head_dim=32, rms_norm_eps=1e-6,
                  num_key_value_heads=1, max_position_embeddings=8192),
    "gemma2": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                   num_attention_heads=2, head_dim=32, rms_norm_eps=1e-6, num_key_value_heads=1,
                   query_pre_attn_scalar=32, sliding_window=64, max_position_embeddings=8192),
    "gemma3_text": dict(hidden_size=64, num_hidden_layers=6, intermediate_size=128,
                        num_attention_heads=2, head_dim=32, rms_norm_eps=1e-6,
                        num_key_value_heads=1, query_pre_attn_scalar=32, sliding_window=16,
                        sliding_window_pattern=6, max_position_embeddings=32768),
}


def write_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
        "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False}))
    return tok.get_vocab_size()


def build_checkpoint(folder: Path, model_type: str) -> Path:
    import importlib

    from mlx_lm.utils import save_model

    folder.mkdir(parents=True)
    vocab = write_tokenizer(folder)
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    args = {**ARGS[model_type], "vocab_size": vocab, "model_type": model_type}
    fields = {f for f in module.ModelArgs.__dataclass_fields__}
    model = module.Model(module.ModelArgs(**{k: v for k, v in args.items() if k in fields}))
    mx.random.seed(0)
    model.update(model.parameters())  # materialize the random init
    mx.eval(model.parameters())
    save_model(folder, model)
    (folder / "config.json").write_text(json.dumps({**args, "eos_token_id": [1, 5],
                                                    "bos_token_id": 2}))
    return folder


@pytest.fixture(scope="module", params=list(ARGS))
def tiny(request, tmp_path_factory):
    folder = build_checkpoint(tmp_path_factory.mktemp("mlx") / f"tiny-{request.param}-it",
                              request.param)
    backend = load_backend(resolve(str(folder)), "mlx")
    yield request.param, backend
    backend.close()


GREEDY = SamplingParams(temperature=0, max_tokens=6)


def run(backend, prompt, sampling=GREEDY, **kw):
    chunks = list(backend.stream(prompt, sampling, **kw))
    return "".join(c.text for c in chunks), chunks[-1].stats


def test_loads_and_generates_each_architecture(tiny):
    model_type, backend = tiny
    info = backend.info
    assert info.backend == "mlx"
    assert info.architecture == {"gemma": "gemma", "gemma2": "gemma2",
                                 "gemma3_text": "gemma3"}[model_type]
    assert (info.bos_id, info.eos_id, info.end_of_turn_id) == (2, 1, 5)
    ids = backend.tokenize(render([{"role": "user", "content": "hello there"}]))
    assert ids[0] == 2 and ids.count(2) == 1 and ids[1] == 4 and 5 in ids  # special ids
    text, stats = run(backend, ids)
    assert stats.generated_tokens + (stats.stop_reason == "stop") >= 1
    assert stats.prompt_tokens == len(ids) and stats.prompt_eval_tokens == len(ids)
    assert stats.stop_reason in ("stop", "length")
    # Greedy is deterministic, and streamed pieces join to the text of the ids.
    backend.trim_cache(0)
    again, stats2 = run(backend, ids)
    assert again == text and stats2.token_ids == stats.token_ids
    assert text == backend.detokenize(stats.token_ids)
    if model_type == "gemma2":  # Gemma 2's sliding-window layers (mlx-lm's own has none)
        kinds = [type(c).__name__ for c in backend._cache]
        from gemma_chat.backends.mlx import SWA_SLACK

        # Its window, with the slack that lets a roll-back trim it after it wraps.
        assert kinds == ["RotatingKVCache", "KVCache"] and backend._cache[0].window == 64
        assert backend._cache[0].max_size == 64 + SWA_SLACK


def test_forced_end_of_turn_and_ignore_eos(tiny):
    _, backend = tiny
    ids = backend.tokenize(render([{"role": "user", "content": "hello"}]))
    text, stats = run(backend, ids, logit_bias={5: 100.0})
    assert stats.stop_reason == "stop" and stats.stop_token == 5 and text == ""
    _, stats = run(backend, ids, SamplingParams(temperature=0, max_tokens=4),
                   logit_bias={5: 100.0}, ignore_eos=True)
    assert stats.stop_reason == "length" and stats.token_ids == [5] * 4


def test_prompt_cache_reuse_and_trim(tiny):
    model_type, backend = tiny
    backend.trim_cache(0)
    p1 = backend.tokenize("<bos>The river runs")
    _, s1 = run(backend, p1)
    p2 = p1 + s1.token_ids + backend.tokenize(" and the sea")
    cached = backend.cached_tokens
    _, s2 = run(backend, p2)
    common = 0
    for a, b in zip(cached, p2):
        if a != b:
            break
        common += 1
    assert s2.prompt_eval_tokens == len(p2) - common
    assert s2.cached_tokens > 0
    # A roll-back to a short prefix: trimmed where mlx-lm can, else re-evaluated and said so.
    _, s3 = run(backend, p1[:2] + backend.tokenize(" sea"))
    assert s3.cached_tokens == 2 or "re-evaluated" in s3.cache_note


def test_multi_turn_evaluates_only_new_tokens(tiny):
    from conftest import assert_third_turn_reuses_cache

    assert_third_turn_reuses_cache(tiny[1], ("hello", "how are you", "and today"))


def test_seed_and_sampling(tiny):
    _, backend = tiny
    ids = backend.tokenize("<bos>Water boils")
    sp = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7, max_tokens=5)
    first = run(backend, ids, sp)[1]
    second = run(backend, ids, sp)[1]
    assert first.token_ids == second.token_ids
    assert "top_k=20" in first.sampler and "temp=1.0" in first.sampler


def test_cli_run_with_mlx_backend(tiny, tmp_path):
    from conftest import run_gemma

    model_type, backend = tiny
    path = backend.info.path
    result = run_gemma("run", "--backend", "mlx", "-m", str(path), "-n", "3", "--temp", "0",
                       "--json", "hello")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["backend"] == "mlx" and data["prompt_format"] == "chat"
    wrong = run_gemma("run", "--backend", "llama.cpp", "-m", str(path), "hello")
    assert wrong.returncode != 0 and "gemma convert" in wrong.stderr
    chat = run_gemma("chat", "--backend", "mlx", "-m", str(path), "-n", "3", "--temp", "0",
                     "--no-autosave", input="hello\n/stats\nhow are you\n/stats\n")
    assert chat.returncode == 0, chat.stderr
    assert "mlx on cpu" in chat.stderr and chat.stderr.count("evaluated") == 2


def test_prompt_cache_save_and_load(tiny, tmp_path):
    _, backend = tiny
    backend.trim_cache(0)
    ids = backend.tokenize("<bos>Water boils at")
    _, first = run(backend, ids)
    saved = backend.cached_tokens
    backend.save_state(tmp_path / "chat.json.kv")
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json.kv"]
    backend.trim_cache(0)
    assert backend.load_state(tmp_path / "chat.json.kv") == saved
    longer = saved + backend.tokenize(" the sea")
    _, stats = run(backend, longer)
    assert stats.prompt_eval_tokens == len(longer) - len(saved)


def test_save_and_resume_a_chat_with_its_prompt_cache(tiny, tmp_path):
    import io

    from gemma_chat.repl import ChatApp, PlainRenderer

    _, backend = tiny
    backend.trim_cache(0)
    notes: list[str] = []
    app = ChatApp(backend, Conversation(backend), SamplingParams(temperature=0, max_tokens=3),
                  renderer=PlainRenderer(io.StringIO()), note=notes.append)
    app.handle("hello")
    app.handle(f"/save {tmp_path / 'talk.json'}")
    backend.trim_cache(0)
    other = ChatApp(backend, Conversation(backend), SamplingParams(temperature=0, max_tokens=3),
                    renderer=PlainRenderer(io.StringIO()), note=notes.append)
    other.handle(f"/load {tmp_path / 'talk.json'}")
    assert "with their KV state" in notes[-1]
    other.handle("again")
    stats = other.conversation.last_stats
    assert stats.cached_tokens > 0 and stats.prompt_eval_tokens < stats.prompt_tokens


def test_bench_with_the_mlx_backend(tiny):
    from conftest import run_gemma

    model_type, backend = tiny
    result = run_gemma("bench", "--backend", "mlx", "-m", str(backend.info.path), "-p", "8",
                       "-n", "4", "-r", "2", "--format", "json", timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["reports"][0]
    assert report["backend"] == "mlx" and report["accelerator_peak"] > 0
    assert [r["test"] for r in report["results"]] == ["pp8", "tg4"]
    for r in report["results"]:
        assert all(t > 0 for t in r["tps"]) and len(r["tps"]) == 2


def test_serve_with_the_mlx_backend(tiny):
    """The server generates in a worker thread; MLX must work there too."""
    from starlette.testclient import TestClient

    from gemma_chat.server import create_app

    _, backend = tiny
    with TestClient(create_app(backend, ["tiny"])) as client:
        for _ in range(2):
            reply = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
                "temperature": 0})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] <= 3
        with client.stream("POST", "/v1/completions", json={
                "prompt": "Water boils", "max_tokens": 3, "stream": True}) as streamed:
            lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"


def test_parallel_slots_decode_each_architecture_together(tiny):
    """Three prompts decoded in one batch (mlx-lm's BatchGenerator: padded caches and array
    masks, Gemma 2's grouped-query masks among them) give each the greedy tokens it gets
    alone; a seeded request gives its own tokens beside the others; a prompt extending an
    earlier one evaluates only its new tokens."""
    from gemma_chat.backends.mlx_slots import MlxSlotEngine

    _, backend = tiny
    prompts = [backend.tokenize(f"<bos>{text}") for text in
               ("Water boils", "The river runs to the sea and", "Gemma is a family")]
    greedy = SamplingParams(temperature=0, max_tokens=6)
    alone = []
    for ids in prompts:
        backend.trim_cache(0)
        alone.append(run(backend, ids, greedy, ignore_eos=True)[1].token_ids)
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=6)
    engine = MlxSlotEngine(backend, 4, n_ctx=4 * 512)
    try:
        by_itself = list(engine.stream(prompts[0], seeded, ignore_eos=True))[-1].stats
        streams = [engine.stream(ids, greedy, ignore_eos=True) for ids in prompts]
        streams.append(engine.stream(prompts[0], seeded, ignore_eos=True))
        results = [list(s)[-1].stats for s in streams]
        assert [r.token_ids for r in results[:3]] == alone
        assert results[3].token_ids == by_itself.token_ids
        longer = prompts[1] + alone[1] + backend.tokenize(" and back")
        extended = list(engine.stream(longer, greedy))[-1].stats
        assert extended.prompt_eval_tokens == len(longer) - len(prompts[1]) - len(alone[1])
        assert engine.status()["busy"] == 0
    finally:
        engine.close()


def test_newer_config_form_is_read_like_the_older_one(tmp_path):
    """transformers 5 writes rope_parameters and layer_types; mlx-lm reads rope_theta,
    rope_local_base_freq and sliding_window_pattern. Both forms must give the same model."""
    import shutil

    from gemma_chat.family import legacy_config_keys

    old = build_checkpoint(tmp_path / "old-form-it", "gemma3_text")
    config = json.loads((old / "config.json").read_text())
    config.update(rope_theta=50000.0, rope_local_base_freq=5000.0, sliding_window_pattern=3)
    (old / "config.json").write_text(json.dumps(config))
    new = tmp_path / "new-form-it"
    shutil.copytree(old, new)
    newer = {k: v for k, v in config.items()
             if k not in ("rope_theta", "rope_local_base_freq", "sliding_window_pattern")}
    newer["rope_parameters"] = {"full_attention": {"rope_theta": 50000.0, "rope_type": "default"},
                                "sliding_attention": {"rope_theta": 5000.0,
                                                      "rope_type": "default"}}
    newer["layer_types"] = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    (new / "config.json").write_text(json.dumps(newer))
    assert legacy_config_keys(newer) == {"rope_theta": 50000.0, "rope_local_base_freq": 5000.0,
                                       "sliding_window_pattern": 3}
    ids = [2] + list(range(10, 60))
    outputs = []
    for folder in (old, new):
        backend = load_backend(resolve(str(folder)), "mlx")
        outputs.append(run(backend, ids, SamplingParams(temperature=0, max_tokens=8))[1].token_ids)
        logits = backend._model(mx.array(ids)[None])
        outputs.append(logits[0, -1].tolist()[:50])
        backend.close()
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3]
