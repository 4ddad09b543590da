"""Pictures end to end on llama.cpp: a tiny Gemma 3 vision-language checkpoint (tests/tiny_vlm.py,
trained to name the colour of the picture it is shown) converted by `gemma convert` to a model
GGUF and its projector, then asked through `gemma run --image`, the chat's `/image`, saved and
resumed conversations and `gemma serve` with the `openai` client; preprocessing and logits checked
against transformers, and the picture's KV cache kept from one turn to the next."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("PIL")
pytestmark = pytest.mark.slow

llama_cpp = pytest.importorskip("llama_cpp")

from conftest import run_gemma, serving  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_vlm import (  # noqa: E402
    COLOURS,
    IMAGE_SIZE,
    QUESTION,
    SOFT,
    build_gemma3_vlm,
    chat_text,
    picture,
    reference_logits,
)

from gemma_chat import media, sessions  # noqa: E402
from gemma_chat.backends.base import (  # noqa: E402
    SamplingParams,
    collect,
    common_prefix,
    media_key,
)
from gemma_chat.backends.llamacpp import LlamaCppBackend  # noqa: E402
from gemma_chat.chat import Conversation  # noqa: E402
from gemma_chat.prompt import PromptBuilder, media_content  # noqa: E402
from gemma_chat.repl import ChatApp, PlainRenderer  # noqa: E402
from gemma_chat.resolve import ResolvedModel  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=4)
# Pictures as people send them: other sizes and shapes than the model's 64x64, PNG and JPEG.
SHAPES = {"red": ((120, 90), "png"), "green": ((50, 200), "jpg"), "blue": ((64, 64), "png"),
          "yellow": ((300, 300), "jpg")}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    folder = build_gemma3_vlm(root / "tiny-gemma3-vlm")
    models = {}
    for quant in ("f32", "q8_0"):
        out = root / f"gguf-{quant}" / f"tiny-gemma3-vlm-{quant}.gguf"
        result = run_gemma("convert", str(folder), "--to", "gguf", "--quant", quant, "--out",
                           str(out), timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"image encoder -> {out.parent}/mmproj-" in result.stderr
        models[quant] = out
    for quant in ("f32", "q8"):
        out = root / f"mlx-{quant}"
        result = run_gemma("convert", str(folder), "--to", "mlx", "--quant", quant, "--out",
                           str(out), timeout=300)
        assert result.returncode == 0, result.stderr
        assert (out / "vision.safetensors").is_file()
        models[f"mlx-{quant}"] = out
    pictures = {}
    for colour, (size, fmt) in SHAPES.items():
        path = root / f"{colour}.{fmt}"
        Image.fromarray(picture(COLOURS[colour], size=size, seed=7)).save(path, quality=95)
        pictures[colour] = path
    return SimpleNamespace(folder=folder, models=models, pictures=pictures, root=root)


def load_backend(path: Path, n_ctx: int = 512) -> LlamaCppBackend:
    return LlamaCppBackend(ResolvedModel(path.stem, path, "gguf", "path"), n_ctx=n_ctx)


@pytest.fixture(scope="module")
def q8(vlm):
    backend = load_backend(vlm.models["q8_0"])
    yield backend
    backend.close()


def test_the_projector_gguf_is_llama_cpps(vlm):
    from gemma_chat.gguf_file import read_gguf

    projector = next(vlm.models["f32"].parent.glob("mmproj-*.gguf"))
    gguf = read_gguf(projector)
    meta = gguf.metadata
    assert meta["general.architecture"] == "clip" and meta["general.type"] == "mmproj"
    assert meta["clip.projector_type"] == "gemma3" and meta["clip.has_vision_encoder"]
    assert meta["clip.vision.image_size"] == IMAGE_SIZE and meta["clip.vision.patch_size"] == 16
    assert meta["clip.vision.projection_dim"] == 256  # the text model's width
    assert meta["clip.vision.projector.scale_factor"] == 2  # 4x4 patches pooled to 2x2
    names = set(gguf.tensors)
    assert {"mm.input_projection.weight", "mm.soft_emb_norm.weight", "v.patch_embd.weight",
            "v.position_embd.weight", "v.blk.1.attn_q.weight", "v.post_ln.weight"} <= names
    # The model GGUF is the text model alone.
    assert not any(n.startswith(("v.", "mm.")) for n in read_gguf(vlm.models["f32"]).tensors)
    shown = run_gemma("show", str(vlm.models["f32"]))
    assert f"projector      {projector.name}: takes pictures (4 tokens each)" in shown.stdout, \
        shown.stdout
    assert ", projector " in shown.stdout  # counted in the memory line


def test_preprocessing_equals_the_hugging_face_processor(vlm):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from gemma_chat.backends.mtmd import squash

    processor = Gemma3ImageProcessorPil.from_pretrained(vlm.folder)
    worst = 0.0
    for path in vlm.pictures.values():
        item = media.load(str(path))
        expected = processor(Image.open(path), return_tensors="np")["pixel_values"][0]
        ours = (squash(item.pixels, IMAGE_SIZE).astype(np.float32) / 255.0 - 0.5) / 0.5
        worst = max(worst, float(np.abs(ours.transpose(2, 0, 1) - expected).max()))
    print(f"largest pixel difference from the processor: {worst:.2e}")
    assert worst < 1e-5


def test_image_prompt_logits_match_transformers(vlm):
    """The same ids as the processor makes, and the logits of the reply's first token within
    1% of the largest logit (seen here: about 1e-4) with the same top token, for each colour."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vlm.folder)
    reference_ids = tokenizer(chat_text(), add_special_tokens=False).input_ids
    soft = tokenizer.convert_tokens_to_ids(SOFT)
    backend = load_backend(vlm.models["f32"])
    try:
        prompts = PromptBuilder(backend)
        figures = []
        for colour, rgb in COLOURS.items():
            pixels = picture(rgb, seed=11)  # 64x64: no resize on either side
            item = media.Media("image", f"{colour}.png", f"{colour}-sha", pixels=pixels)
            ids = prompts.chat([{"role": "user", "content": media_content([item], QUESTION)}])
            key = media_key(item.sha256, 4)
            assert [soft if t == key else t for t in ids] == reference_ids
            text, stats = collect(backend.stream(ids, SamplingParams(temperature=0,
                                                                     max_tokens=1)))
            ours = backend._logits_view().copy()
            ref = reference_logits(vlm.folder, reference_ids, pixels)[-1]
            err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
            figures.append(f"{colour}: max |diff| {err:.2e} of max |logit| {scale:.1f}")
            assert err < 0.01 * scale, figures[-1]
            assert int(ours.argmax()) == int(ref.argmax())
            assert colour.startswith(text)
        print("; ".join(figures))
    finally:
        backend.close()


@pytest.mark.parametrize("model", ["q8_0", "mlx-q8"])
def test_gemma_run_names_the_colour_it_is_shown(vlm, model):
    backend = "mlx" if model.startswith("mlx") else "llama.cpp"
    for colour, path in vlm.pictures.items():
        result = run_gemma("run", "-m", str(vlm.models[model]), "--backend", backend, "--chat",
                           "--image", str(path), QUESTION, "--temp", "0", "-n", "4")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == colour, (colour, result.stdout, result.stderr)


def test_mlx_image_prompt_logits_match_transformers(vlm):
    """MLX (mlx-lm's text model, mlx-vlm's image encoder, our masks: the picture's tokens see
    each other) at every position after the picture, against transformers: within 1e-3 of the
    largest logit (seen here: about 1e-5); with mlx-lm's causal masks it is far off."""
    import mlx.core as mx
    from transformers import AutoTokenizer

    from gemma_chat.backends.mlx import MLXBackend, set_picture_spans

    tokenizer = AutoTokenizer.from_pretrained(vlm.folder)
    reference_ids = tokenizer(chat_text(), add_special_tokens=False).input_ids
    soft = tokenizer.convert_tokens_to_ids(SOFT)
    path = vlm.models["mlx-f32"]
    backend = MLXBackend(ResolvedModel(path.name, path, "mlx", "path"), n_ctx=512)
    assert backend.info.media == ("image",)
    prompts = PromptBuilder(backend)
    figures = []
    for colour, rgb in COLOURS.items():
        pixels = picture(rgb, seed=11)
        item = media.Media("image", f"{colour}.png", f"{colour}-mlx", pixels=pixels)
        ids = prompts.chat([{"role": "user", "content": media_content([item], QUESTION)}])
        assert [soft if t < 0 else t for t in ids] == reference_ids
        tokens = mx.array([[max(t, 0) for t in ids]])
        embeddings = backend._embeddings(ids)[None]
        ref = reference_logits(vlm.folder, reference_ids, pixels)
        after = ids.index(min(ids)) + 4
        errors = []
        for spans in (backend._picture_spans(ids), []):  # ours, then mlx-lm's causal masks
            set_picture_spans(backend.model, spans)
            ours = np.array(backend.model(tokens, input_embeddings=embeddings)[0]
                            .astype(mx.float32))
            errors.append(float(np.abs(ours[after:] - ref[after:]).max()))
        scale = float(np.abs(ref[after:]).max())
        figures.append(f"{colour}: max |diff| {errors[0]:.1e} of {scale:.1f} "
                       f"(causal: {errors[1]:.1e})")
        assert errors[0] < 1e-3 * scale < errors[1], figures[-1]
        text, _ = collect(backend.stream(ids, SamplingParams(temperature=0, max_tokens=4)))
        assert text == colour
    print("; ".join(figures))


def test_media_errors_are_one_line_each(vlm, tmp_path):
    model = str(vlm.models["q8_0"])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff not a jpeg" * 20)
    tone = tmp_path / "tone.wav"
    import soundfile

    soundfile.write(tone, np.zeros(16_000, dtype=np.float32), 16_000)
    cases = [
        (["-m", model, "--image", str(junk)], "junk.jpg"),
        (["-m", model, "--image", str(tmp_path / "gone.png")], "no such file"),
        (["-m", model, "--audio", str(tone)], "takes image, not audio"),
        (["--image", str(vlm.pictures["red"])], "gemma-3-270m does not take images"),
    ]
    for args, words in cases:
        result = run_gemma("run", *args, "--chat", "hi", "-n", "2")
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr


def test_an_mlx_chat_keeps_the_picture_in_its_cache(vlm):
    from gemma_chat.backends.mlx import MLXBackend

    path = vlm.models["mlx-q8"]
    shown = run_gemma("show", str(path))
    assert "encoders       takes pictures (4 tokens each)" in shown.stdout, shown.stdout
    backend = MLXBackend(ResolvedModel(path.name, path, "mlx", "path"), n_ctx=512)
    convo = Conversation(backend)
    picture_ = media.load(str(vlm.pictures["yellow"]))
    text, _ = collect(convo.send(QUESTION, GREEDY, media=[picture_]))
    assert text == "yellow"
    first = convo.ids
    expected = len(convo.ids_for(convo.exchanges, "Thank you.")) - len(first) + \
        len(convo.prompts.closing)
    collect(convo.send("Thank you.", GREEDY))
    # mlx-lm has fed the reply's stop token (<end_of_turn>) already: one fewer to evaluate.
    assert convo.last_stats.prompt_eval_tokens in (expected - 1, expected)


def test_a_chat_keeps_the_picture_and_its_cache(vlm, q8, tmp_path):
    notes: list[str] = []
    out = io.StringIO()
    app = ChatApp(q8, Conversation(q8), GREEDY, renderer=PlainRenderer(out), note=notes.append)
    app.handle(f"/image {vlm.pictures['red']}")
    assert "attached red.png (120x90 image)" in notes[-1] and "1 attached" in app.toolbar()
    app.handle(QUESTION)
    convo = app.conversation
    assert out.getvalue().strip() == "red" and convo.exchanges[0].media[0].name == "red.png"
    first = convo.ids

    # The next turn evaluates only its own tokens: the picture stays in the KV cache.
    # The cache holds the first prompt and the reply; the closing of the reply and the new
    # turn are what is left to evaluate.
    expected = len(convo.ids_for(convo.exchanges, "Thank you.")) - len(first) + \
        len(convo.prompts.closing)
    app.handle("Thank you.")
    assert convo.last_stats.prompt_eval_tokens == expected
    assert convo.last_stats.cached_tokens == len(first) - len(convo.prompts.closing)

    # A message that names a picture file attaches it, and says so.
    app.handle(f"{QUESTION} {vlm.pictures['blue']}")
    assert any("attached blue.jpg" in n or "attached blue.png" in n for n in notes)
    assert convo.exchanges[-1].media[0].name == vlm.pictures["blue"].name

    # Saved and resumed with the KV state: the pictures come back (checked by hash) and the
    # next turn still evaluates only its new tokens.
    saved_path = tmp_path / "chat.json"
    app.handle(f"/save {saved_path}")
    again = ChatApp(q8, Conversation(q8), GREEDY, renderer=PlainRenderer(io.StringIO()),
                    note=notes.append)
    again.handle(f"/load {saved_path}")
    assert "with their KV state" in notes[-1]
    restored = again.conversation.exchanges
    assert [m.sha256 for ex in restored for m in ex.media] == \
        [m.sha256 for ex in convo.exchanges for m in ex.media]
    resumed = again.conversation
    prompt = resumed.ids_for(resumed.exchanges, "Again?")
    held = common_prefix(q8.cached_tokens, prompt)  # the restored KV state
    assert held > max(i for i, t in enumerate(prompt) if t < 0)  # both pictures in it
    again.handle("Again?")
    assert resumed.last_stats.prompt_eval_tokens == len(prompt) - held < 25

    # A picture that is gone when the chat is resumed: said on one line, the chat goes on.
    moved = vlm.root / "moved.png"
    vlm.pictures["red"].rename(moved)
    try:
        lost = ChatApp(q8, Conversation(q8), GREEDY, renderer=PlainRenderer(io.StringIO()),
                       note=notes.append)
        lost.handle(f"/load {saved_path}")
        assert "without 1 of their attachments: no such file" in notes[-1]
        assert len(sessions.load(saved_path).exchanges) == 3
    finally:
        moved.rename(vlm.pictures["red"])


def test_serve_takes_pictures_from_the_openai_client(vlm):
    openai = pytest.importorskip("openai")
    from gemma_chat.backends.slots import SlotEngine
    from gemma_chat.server import create_app

    backend = load_backend(vlm.models["q8_0"], n_ctx=1024)
    backend.release_context()
    engine = SlotEngine(backend, 2)
    try:
        with serving(create_app(backend, [backend.info.name], engine=engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none")

            def question(colour: str) -> dict:
                data = base64.b64encode(vlm.pictures[colour].read_bytes()).decode()
                kind = "jpeg" if vlm.pictures[colour].suffix == ".jpg" else "png"
                return {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,"
                                                               f"{data}"}},
                    {"type": "text", "text": QUESTION}]}

            def ask(colour: str, stream: bool = False):
                return client.chat.completions.create(
                    model=backend.info.name, messages=[question(colour)], temperature=0,
                    max_tokens=4, stream=stream)

            answers, threads = {}, []
            for colour in COLOURS:  # four at once over two slots
                def one(c=colour):
                    answers[c] = ask(c).choices[0].message.content
                threads.append(threading.Thread(target=one))
                threads[-1].start()
            for t in threads:
                t.join(60)
            assert answers == {c: c for c in COLOURS}
            streamed = "".join(c.choices[0].delta.content or "" for c in ask("green", True)
                               if c.choices)
            assert streamed == "green"

            # Ollama's own client: a picture path in `images` (it sends the file as base64).
            import ollama

            olla = ollama.Client(host=url)
            said = olla.chat(model=backend.info.name, options={"temperature": 0,
                                                               "num_predict": 4},
                             messages=[{"role": "user", "content": QUESTION,
                                        "images": [str(vlm.pictures["yellow"])]}])
            assert said.message.content == "yellow"
            pieces = [p.response for p in olla.generate(
                model=backend.info.name, prompt=QUESTION, images=[str(vlm.pictures["red"])],
                options={"temperature": 0, "num_predict": 4}, stream=True)]
            assert "".join(pieces) == "red"

            # A follow-up that repeats the conversation reuses the picture's cache.
            first = ask("blue")
            follow = client.chat.completions.create(
                model=backend.info.name, temperature=0, max_tokens=2, messages=[
                    question("blue"),
                    {"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Thanks."}])
            details = follow.usage.prompt_tokens_details
            assert details.cached_tokens >= first.usage.prompt_tokens - 1

            tone = io.BytesIO()
            import soundfile

            soundfile.write(tone, np.zeros(8000, dtype=np.float32), 16_000, format="WAV")
            with pytest.raises(openai.BadRequestError, match="takes image, not audio"):
                client.chat.completions.create(model=backend.info.name, messages=[
                    {"role": "user", "content": [
                        {"type": "input_audio", "input_audio": {
                            "data": base64.b64encode(tone.getvalue()).decode(),
                            "format": "wav"}},
                        {"type": "text", "text": "hi"}]}])
            with pytest.raises(openai.BadRequestError, match="--allow-remote-media"):
                client.chat.completions.create(model=backend.info.name, messages=[
                    {"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}},
                        {"type": "text", "text": "hi"}]}])
    finally:
        engine.close()
        backend.close()


def test_a_chat_takes_a_picture_by_url(vlm, q8):
    """`/image URL` fetches the picture (the chat is the user's own: URLs are allowed there)."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(vlm.pictures["green"].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        notes: list[str] = []
        out = io.StringIO()
        app = ChatApp(q8, Conversation(q8), GREEDY, renderer=PlainRenderer(out),
                      note=notes.append)
        url = f"http://127.0.0.1:{server.server_port}/{vlm.pictures['green'].name}"
        app.handle(f"/image {url}")
        assert "attached green.jpg (50x200 image)" in notes[-1]
        app.handle(QUESTION)
        assert out.getvalue().strip() == "green"
        app.handle(f"/image http://127.0.0.1:{server.server_port}/missing.png")
        assert notes[-1].startswith("error: could not fetch") and len(notes[-1]) < 200
    finally:
        server.shutdown()


def test_pictures_to_a_model_on_a_server(vlm):
    """`gemma run --url --image` and the chat's `/image` against `gemma serve` on the tiny VLM:
    the picture goes as a data URL, and the model names its colour as it does locally."""
    from gemma_chat.server import create_app

    backend = load_backend(vlm.models["q8_0"], n_ctx=1024)
    try:
        with serving(create_app(backend, [backend.info.name])) as url:
            for colour, path in vlm.pictures.items():
                result = run_gemma("run", "--url", url, "--image", str(path), QUESTION,
                                   "--temp", "0", "-n", "4")
                assert result.returncode == 0, result.stderr
                assert result.stdout.strip() == colour, (colour, result.stderr)
            colour, path = next(iter(vlm.pictures.items()))
            chat = run_gemma("chat", "--url", url, "--temp", "0", "-n", "4", "--no-autosave",
                             input=f"/image {path}\n{QUESTION}\n")
            assert chat.returncode == 0, chat.stderr
            assert chat.stdout.strip() == colour
    finally:
        backend.close()


def test_a_picture_attached_in_the_chat_page(vlm, tmp_path, monkeypatch):
    """The chat page in a real Chromium, on the server with the page and the tiny VLM: a
    picture attached with the page's Attach button goes with the message, and the model names
    its colour (the 270M's page hides the button: it reads text only)."""
    import time

    from conftest import chat_page

    monkeypatch.setenv("GEMMA_HOME", str(tmp_path / "home"))
    backend = load_backend(vlm.models["q8_0"], n_ctx=1024)
    try:
        with chat_page(backend, [backend.info.name]) as page:
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "4")
            for colour in ("red", "blue"):
                page.click("#new-chat")  # one picture per conversation, as the model learnt
                page.set_input_files("#file", str(vlm.pictures[colour]))
                page.wait_for_selector("#attached span")
                page.fill("#input", QUESTION)
                page.press("#input", "Enter")
                deadline = time.time() + 60
                while page.locator(".msg.assistant .tools").count() < 1:
                    assert time.time() < deadline  # the exchange is stored and drawn again
                    time.sleep(0.1)
                reply = page.locator(".msg.assistant .body").last.inner_text().strip()
                assert reply == colour, (colour, reply)
                assert page.locator(".msg.user .note").count() == 0  # redrawn from the store
    finally:
        backend.close()
