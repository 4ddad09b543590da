"""Gemma 4 pictures and sound on llama.cpp: a tiny Gemma 4 with a vision tower and an audio
conformer (tests/tiny_vlm.py, the real Gemma 4 vocabulary) converted by `gemma convert` to a
model GGUF and a projector GGUF with both encoders, checked against transformers (the
embeddings a picture and a sound clip become, and the logits of a prompt with a picture), then
through `gemma run --image --audio` and a chat that keeps both in its KV cache."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("PIL")
pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")

from conftest import run_gemma  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_vlm import build_gemma4_vlm  # noqa: E402

from gemma_chat import media  # noqa: E402
from gemma_chat.backends import mlx as mlx_backend  # noqa: E402
from gemma_chat.backends.base import (  # noqa: E402
    SamplingParams,
    collect,
    common_prefix,
    media_key,
)
from gemma_chat.backends.llamacpp import LlamaCppBackend  # noqa: E402
from gemma_chat.chat import Conversation  # noqa: E402
from gemma_chat.gguf_file import read_gguf  # noqa: E402
from gemma_chat.prompt import PromptBuilder, media_content  # noqa: E402
from gemma_chat.resolve import ResolvedModel, find_projector  # noqa: E402

IMAGE_TOKEN, AUDIO_TOKEN = 258880, 258881  # Gemma 4's soft tokens, as transformers counts them


@pytest.fixture(scope="module")
def g4(tmp_path_factory):
    from gemma4_data import vocab_gguf

    root = tmp_path_factory.mktemp("g4vlm")
    folder = build_gemma4_vlm(root / "tiny-gemma4-vlm", vocab_gguf=vocab_gguf())
    models = {}
    for quant in ("f32", "f16"):
        out = root / quant / f"tiny-gemma4-vlm-{quant}.gguf"
        result = run_gemma("convert", str(folder), "--to", "gguf", "--quant", quant, "--out",
                           str(out), timeout=600)
        assert result.returncode == 0, result.stderr
        models[quant] = out
    # A picture already at the size the processor gives it (768 px: 48x48 patches, 256
    # tokens at the default budget), so that neither side resizes it.
    rng = np.random.default_rng(0)
    picture = root / "noise.png"
    Image.fromarray((rng.random((768, 768, 3)) * 255).astype(np.uint8)).save(picture)
    import soundfile

    t = np.arange(2 * 22_050) / 22_050
    sound = root / "tone.wav"
    soundfile.write(sound, 0.3 * np.sin(2 * np.pi * 300 * t) * np.exp(-t), 22_050)
    backend = LlamaCppBackend(ResolvedModel("tiny-gemma4-vlm", models["f32"], "gguf", "path"),
                              n_ctx=1024)
    yield SimpleNamespace(folder=folder, models=models, picture=picture, sound=sound,
                          backend=backend)
    backend.close()


def hf_model(folder: Path):
    import torch
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def test_the_projector_holds_both_encoders(g4):
    for quant, wide in (("f32", "F32"), ("f16", "F16")):
        projector = find_projector(g4.models[quant])
        info = read_gguf(projector)
        meta = info.metadata
        assert meta["clip.vision.projector_type"] == "gemma4v"
        assert meta["clip.audio.projector_type"] == "gemma4a"
        assert meta["clip.has_vision_encoder"] and meta["clip.has_audio_encoder"]
        assert meta["clip.vision.projection_dim"] == meta["clip.audio.projection_dim"] == 64
        assert meta["clip.audio.num_mel_bins"] == 128 and meta["clip.use_gelu"]
        assert {"v.patch_embd.weight", "v.position_embd.weight", "mm.input_projection.weight",
                "a.conv1d.0.weight", "a.blk.0.per_dim_scale.weight", "a.blk.0.conv_dw.weight",
                "mm.a.input_projection.weight"} <= set(info.tensors)
        types = info.tensor_types
        assert types.get(wide, 0) > 0 and types.get("F32", 0) > 0
    shown = run_gemma("show", str(g4.models["f32"]))
    assert "takes pictures (up to 280 tokens each; --image-tokens) and sound (25 tokens a " \
        "second, 30 s a clip)" in shown.stdout, shown.stdout


def test_picture_and_sound_become_what_transformers_makes(g4):
    """The embeddings llama.cpp decodes for a picture and a sound clip against transformers'
    (its own processor and feature extractor): relative error under 1% (seen: about 1e-3)."""
    import torch
    from transformers import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    model = hf_model(g4.folder)
    picture, sound = media.load(str(g4.picture)), media.load(str(g4.sound))
    projector = g4.backend._projector_for(picture)
    pixels = Gemma4ImageProcessorPil(max_soft_tokens=280)(Image.open(g4.picture),
                                                          return_tensors="pt")
    features = Gemma4AudioFeatureExtractor()([sound.samples], sampling_rate=16_000,
                                             return_tensors="pt")
    with torch.no_grad():
        image = model.model.get_image_features(pixels["pixel_values"],
                                               pixels["image_position_ids"]).pooler_output
        audio = model.model.get_audio_features(features["input_features"],
                                               features["input_features_mask"]).pooler_output
    figures = []
    for name, ref, ours in (("picture", image, projector.embeddings(picture)),
                            ("sound", audio, projector.embeddings(sound))):
        ref = ref[0] if isinstance(ref, (list, tuple)) else ref  # one per picture
        ref = ref.reshape(-1, ref.shape[-1]).numpy()
        assert ref.shape == ours.shape, (name, ref.shape, ours.shape)
        rel = float(np.linalg.norm(ref - ours) / np.linalg.norm(ref))
        figures.append(f"{name}: {len(ours)} tokens, relative error {rel:.1e}")
        assert rel < 1e-2, figures[-1]
    assert len(projector.embeddings(sound)) == 50  # 2 s at 25 tokens a second

    # Other shapes and budgets: sized as the processor sizes them (small ones enlarged).
    from gemma_chat.backends.mtmd import Projector

    odd = Image.fromarray((np.random.default_rng(1).random((130, 300, 3)) * 255)
                          .astype(np.uint8))
    path = g4.picture.with_name("odd.png")
    odd.save(path)
    item = media.load(str(path))
    for budget in (70, 560):
        other = Projector(projector.path, g4.backend._llm._model.model, threads=2,
                          use_gpu=False, image_tokens=budget)
        try:
            processed = Gemma4ImageProcessorPil(max_soft_tokens=budget)(odd, return_tensors="pt")
            with torch.no_grad():
                ref = model.model.get_image_features(processed["pixel_values"],
                                                     processed["image_position_ids"])
            ref = ref.pooler_output
            ref = (ref[0] if isinstance(ref, (list, tuple)) else ref)
            ref = ref.reshape(-1, ref.shape[-1]).numpy()
            ours = other.embeddings(item)
            assert len(ours) == int(processed["num_soft_tokens_per_image"][0]) == len(ref)
            rel = float(np.linalg.norm(ref - ours) / np.linalg.norm(ref))
            figures.append(f"300x130 at {budget}: {len(ours)} tokens, relative error {rel:.1e}")
            assert rel < 2e-2, figures[-1]
        finally:
            other.close()
    print("; ".join(figures))


def test_a_prompt_with_a_picture_gives_transformers_logits(g4):
    import torch
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    backend = g4.backend
    picture = media.load(str(g4.picture))
    ids = PromptBuilder(backend).chat([{"role": "user",
                                        "content": media_content([picture], "Describe it.")}])
    reference_ids = [IMAGE_TOKEN if t < 0 else t for t in ids]
    assert reference_ids.count(IMAGE_TOKEN) == 256
    collect(backend.stream(ids, SamplingParams(temperature=0, max_tokens=1)))
    ours = backend._logits_view().copy()
    pixels = Gemma4ImageProcessorPil(max_soft_tokens=280)(Image.open(g4.picture),
                                                          return_tensors="pt")
    input_ids = torch.tensor([reference_ids])
    with torch.no_grad():
        out = hf_model(g4.folder)(input_ids=input_ids, pixel_values=pixels["pixel_values"],
                                  image_position_ids=pixels["image_position_ids"],
                                  mm_token_type_ids=(input_ids == IMAGE_TOKEN).long())
    ref = out.logits[0, -1].numpy()
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    print(f"last-position logits: max |diff| {err:.2e} of max |logit| {scale:.2f}")
    assert err < 0.02 * scale
    assert int(ours.argmax()) == int(ref.argmax())


def test_gemma_run_and_a_chat_with_picture_and_sound(g4, tmp_path):
    result = run_gemma("run", "-m", str(g4.models["f16"]), "--chat", "--image", str(g4.picture),
                       "--audio", str(g4.sound), "What do you see and hear?", "--temp", "0",
                       "-n", "4", "--json")
    assert result.returncode == 0, result.stderr
    assert "tone.wav: resampled from 22050 Hz to 16000 Hz" in result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["prompt_tokens"] > 256 + 50 and stats["generated_tokens"] >= 1

    backend = g4.backend
    convo = Conversation(backend)
    sound, picture = media.load(str(g4.sound)), media.load(str(g4.picture))
    collect(convo.send("What is this?", SamplingParams(temperature=0, max_tokens=3),
                       media=[picture, sound]))
    prompt = convo.ids_for(convo.exchanges, "And now?")
    held = common_prefix(backend.cached_tokens, prompt)
    assert held > max(i for i, t in enumerate(prompt) if t < 0)  # both still in the cache
    collect(convo.send("And now?", SamplingParams(temperature=0, max_tokens=3)))
    assert convo.last_stats.prompt_eval_tokens == len(prompt) - held < 40


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """A real spoken clip: espeak-ng's voice saying a sentence (22,050 Hz WAV)."""
    import shutil
    import subprocess

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "What colour is the sky today?"], check=True,
                   timeout=60)
    return path


def test_a_spoken_clip_through_the_server(g4, speech):
    """espeak-ng's speech as transformers hears it (the same token count and embeddings), then
    sent by the openai client as an input_audio part, beside a picture, to parallel slots."""
    import base64

    import openai
    import torch
    from conftest import serving
    from transformers import Gemma4AudioFeatureExtractor

    from gemma_chat.backends.slots import SlotEngine
    from gemma_chat.server import create_app

    clip = media.load(str(speech))
    assert clip.note == "resampled from 22050 Hz to 16000 Hz" and 1.0 < clip.seconds < 4.0
    features = Gemma4AudioFeatureExtractor()([clip.samples], sampling_rate=16_000,
                                             return_tensors="pt")
    with torch.no_grad():
        ref = hf_model(g4.folder).model.get_audio_features(
            features["input_features"], features["input_features_mask"]).pooler_output
    ref = ref.reshape(-1, ref.shape[-1]).numpy()
    ours = g4.backend._projector_for(clip).embeddings(clip)
    assert ours.shape == ref.shape
    assert np.linalg.norm(ref - ours) / np.linalg.norm(ref) < 1e-2

    backend = LlamaCppBackend(ResolvedModel("tiny-gemma4-vlm", g4.models["f16"], "gguf",
                                            "path"), n_ctx=1024)
    backend.release_context()
    engine = SlotEngine(backend, 2)
    try:
        with serving(create_app(backend, [backend.info.name], engine=engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none")
            picture = base64.b64encode(g4.picture.read_bytes()).decode()
            reply = client.chat.completions.create(
                model=backend.info.name, temperature=0, max_tokens=3, messages=[
                    {"role": "user", "content": [
                        {"type": "input_audio", "input_audio": {
                            "data": base64.b64encode(speech.read_bytes()).decode(),
                            "format": "wav"}},
                        {"type": "image_url",
                         "image_url": {"url": f"data:image/png;base64,{picture}"}},
                        {"type": "text", "text": "Answer the question you hear."}]}])
            assert reply.choices[0].finish_reason in ("stop", "length")
            assert reply.usage.prompt_tokens > len(ours) + 256
    finally:
        engine.close()
        backend.close()


def test_chat_commands_attach_picture_and_sound(g4, tmp_path):
    import io

    import soundfile

    from gemma_chat.repl import ChatApp, PlainRenderer

    notes: list[str] = []
    app = ChatApp(g4.backend, Conversation(g4.backend),
                  SamplingParams(temperature=0, max_tokens=2),
                  renderer=PlainRenderer(io.StringIO()), note=notes.append)
    app.handle(f"/audio {g4.sound}")
    assert "attached tone.wav (2.0 s of audio); resampled from 22050 Hz to 16000 Hz" in notes[-1]
    app.handle(f"/image {g4.picture}")
    assert "2 attached" in app.toolbar()
    app.handle("What are these?")
    [exchange] = app.conversation.exchanges
    assert [m.kind for m in exchange.media] == ["audio", "image"] and not app.attached
    assert app.conversation.last_stats.prompt_tokens > 256 + 50

    # A lecture is refused on one line, with the limit; the chat is untouched.
    lecture = tmp_path / "lecture.wav"
    soundfile.write(lecture, np.zeros(16_000 * 600, dtype=np.float32), 16_000)
    app.handle(f"/audio {lecture}")
    assert notes[-1].startswith("error: lecture.wav is 600 s long") and "30 s" in notes[-1]
    app.handle("/audio")
    assert "usage: /audio PATH" in notes[-1]
    assert len(app.conversation.exchanges) == 1 and not app.attached


# -- MLX: mlx-lm's Gemma 4 text model with mlx-vlm's encoders ---------------------------------

@pytest.fixture(scope="module")
def g4_mlx(g4):
    pytest.importorskip("mlx_vlm")
    from gemma_chat.backends.mlx import MLXBackend

    out = g4.folder.parent / "mlx-f32"
    result = run_gemma("convert", str(g4.folder), "--to", "mlx", "--quant", "f32", "--out",
                       str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    assert (out / "vision.safetensors").is_file()
    shown = run_gemma("show", str(out))
    assert "encoders       takes pictures (up to 280 tokens each; --image-tokens) and sound " \
        "(25 tokens a second, 30 s a clip)" in shown.stdout, shown.stdout
    backend = MLXBackend(ResolvedModel("tiny-gemma4-vlm", out, "mlx", "path"), n_ctx=1024)
    yield SimpleNamespace(path=out, backend=backend)
    backend.close()


def picture_and_sound_prompt(backend, picture, sound) -> list[int]:
    return PromptBuilder(backend).chat([{"role": "user", "content": media_content(
        [picture, sound], "What do you see and hear?")}])


def test_mlx_encoders_and_logits_match_transformers(g4, g4_mlx):
    """On MLX, a picture and a clip become what transformers makes of them (relative error
    under 1e-3), the prompt holds the same ids as on llama.cpp, and the logits at every position
    after the picture (whose tokens see each other in the sliding-window layers) are within
    1e-3 of the largest, against transformers in float32."""
    import mlx.core as mx
    import torch
    from transformers import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    backend = g4_mlx.backend
    assert backend.info.media == ("image", "audio")
    picture, sound = media.load(str(g4.picture)), media.load(str(g4.sound))
    ids = picture_and_sound_prompt(backend, picture, sound)
    assert ids == picture_and_sound_prompt(g4.backend, picture, sound)  # as llama.cpp has it
    model = hf_model(g4.folder)
    pixels = Gemma4ImageProcessorPil(max_soft_tokens=280)(Image.open(g4.picture),
                                                          return_tensors="pt")
    features = Gemma4AudioFeatureExtractor()([sound.samples], sampling_rate=16_000,
                                             return_tensors="pt")
    scale = backend.model.language_model.model.embed_scale
    with torch.no_grad():
        image = model.model.get_image_features(pixels["pixel_values"],
                                               pixels["image_position_ids"]).pooler_output
        audio = model.model.get_audio_features(features["input_features"],
                                               features["input_features_mask"]).pooler_output
    image, audio = (ref[0] if isinstance(ref, (list, tuple)) else ref for ref in (image, audio))
    image, audio = (ref.reshape(-1, ref.shape[-1]).numpy() for ref in (image, audio))
    figures = []
    for name, ref, item in (("picture", image, picture), ("sound", audio, sound)):
        ours = np.array(backend._vision.encode(item).astype(mx.float32)) * scale
        assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
        rel = float(np.linalg.norm(ref - ours) / np.linalg.norm(ref))
        figures.append(f"{name}: {len(ours)} tokens, relative error {rel:.1e}")
        assert rel < 1e-3, figures[-1]

    image_key = media_key(picture.sha256, 256)
    reference_ids = [IMAGE_TOKEN if t == image_key else AUDIO_TOKEN if t < 0 else t
                     for t in ids]
    assert reference_ids.count(AUDIO_TOKEN) == len(audio)
    input_ids = torch.tensor([reference_ids])
    with torch.no_grad():
        ref = model(input_ids=input_ids, pixel_values=pixels["pixel_values"],
                    image_position_ids=pixels["image_position_ids"],
                    input_features=features["input_features"],
                    input_features_mask=features["input_features_mask"],
                    mm_token_type_ids=(input_ids == IMAGE_TOKEN).long()).logits[0].numpy()
    after = reference_ids.index(IMAGE_TOKEN) + 1
    spans = backend._picture_spans(ids)
    assert len(spans) == 1 and spans[0][1] - spans[0][0] == 256
    for chunk in (2048, 150):  # one call; a prefill in pieces, the picture whole in one
        size = mlx_backend.prefill_step(spans, len(ids), chunk)
        assert (size >= len(ids)) == (chunk == 2048)
        ours = _mlx_logits(backend, ids, chunk)
        err = float(np.abs(ours[after:] - ref[after:]).max())
        top = float(np.abs(ref[after:]).max())
        figures.append(f"logits (prefill {chunk}): max |diff| {err:.1e} of {top:.2f}")
        assert err < 1e-3 * top, figures[-1]
    # The backend's own prefill (mlx-lm's generate_step) picks what transformers ranks first.
    backend.trim_cache(0)
    _, stats = collect(backend.stream(ids, SamplingParams(temperature=0, max_tokens=1)))
    assert (stats.token_ids or [stats.stop_token]) == [int(ref[-1].argmax())]
    print("; ".join(figures))


def _mlx_logits(backend, ids: list[int], step: int) -> np.ndarray:
    """Every position's logits, the prompt fed in the chunks the backend's prefill uses."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model = backend.model
    cache = make_prompt_cache(model)
    spans = backend._picture_spans(ids)
    size = mlx_backend.prefill_step(spans, len(ids), step)
    embeddings = backend._embeddings(ids)
    tokens = mx.array([max(t, 0) for t in ids])
    out = []
    mlx_backend.set_picture_spans(model, spans)
    try:
        for start in range(0, len(ids), size):
            logits = model(tokens[None, start:start + size], cache=cache,
                           input_embeddings=embeddings[None, start:start + size])
            out.append(np.array(logits[0].astype(mx.float32)))
    finally:
        mlx_backend.set_picture_spans(model, [])
    return np.concatenate(out)


def test_mlx_chat_keeps_picture_and_sound_in_its_cache(g4, g4_mlx, tmp_path):
    """`gemma run --backend mlx --image --audio`, then the chat's `/image` and `/audio`, and a
    next turn that evaluates only its own tokens: the picture and the clip stay in the cache."""
    result = run_gemma("run", "-m", str(g4_mlx.path), "--backend", "mlx", "--chat",
                       "--image", str(g4.picture), "--audio", str(g4.sound),
                       "What do you see and hear?", "--temp", "0", "-n", "3", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["prompt_tokens"] > 256 + 50 and stats["generated_tokens"] >= 1

    import io

    from gemma_chat.repl import ChatApp, PlainRenderer

    backend = g4_mlx.backend
    backend.trim_cache(0)
    notes: list[str] = []
    app = ChatApp(backend, Conversation(backend), SamplingParams(temperature=0, max_tokens=3),
                  renderer=PlainRenderer(io.StringIO()), note=notes.append)
    app.handle(f"/image {g4.picture}")
    app.handle(f"/audio {g4.sound}")
    assert "attached tone.wav (2.0 s of audio)" in notes[-1] and "2 attached" in app.toolbar()
    app.handle("What is this?")
    convo = app.conversation
    assert [m.kind for m in convo.exchanges[0].media] == ["image", "audio"]
    prompt = convo.ids_for(convo.exchanges, "And now?")
    held = common_prefix(backend.cached_tokens, prompt)
    assert held > max(i for i, t in enumerate(prompt) if t < 0)  # both still in the cache
    app.handle("And now?")
    assert convo.last_stats.prompt_eval_tokens == len(prompt) - held < 40


def test_mlx_serves_a_spoken_clip_and_a_picture(g4, g4_mlx, speech):
    """The openai client sends a picture and espeak-ng's speech to `gemma serve` on MLX."""
    import base64

    import openai
    from conftest import serving

    from gemma_chat.server import create_app

    backend = g4_mlx.backend
    backend.trim_cache(0)
    with serving(create_app(backend, [backend.info.name])) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        picture = base64.b64encode(g4.picture.read_bytes()).decode()
        content = [
            {"type": "input_audio", "input_audio": {
                "data": base64.b64encode(speech.read_bytes()).decode(), "format": "wav"}},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{picture}"}},
            {"type": "text", "text": "Answer the question you hear."}]
        reply = client.chat.completions.create(
            model=backend.info.name, temperature=0, max_tokens=3,
            messages=[{"role": "user", "content": content}])
        assert reply.choices[0].finish_reason in ("stop", "length")
        clip = media.load(str(speech))
        assert reply.usage.prompt_tokens > len(backend._vision.encode(clip)) + 256
        again = client.chat.completions.create(
            model=backend.info.name, temperature=0, max_tokens=3,
            messages=[{"role": "user", "content": content}])
        assert again.choices[0].message.content == reply.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens >= reply.usage.prompt_tokens - 1
