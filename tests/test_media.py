"""Reading pictures and sound (gemma_chat.media), media in prompts, and the servers' media parts:
real Pillow, libsndfile and libsoxr on files made here; the prompt side on a scripted backend."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("soundfile")
import soundfile  # noqa: E402
from fakes import ScriptedBackend  # noqa: E402
from PIL import Image  # noqa: E402

from gemma_chat import media  # noqa: E402
from gemma_chat.backends import base  # noqa: E402
from gemma_chat.errors import InvalidMessages  # noqa: E402
from gemma_chat.media import MediaError  # noqa: E402
from gemma_chat.prompt import GEMMA_TURNS, PromptBuilder, media_content  # noqa: E402
from gemma_chat.server import ollama  # noqa: E402
from gemma_chat.server.core import APIError  # noqa: E402
from gemma_chat.server.openai import media_content as openai_parts  # noqa: E402
from gemma_chat.template import MediaPart, parts  # noqa: E402


def png_bytes(size=(40, 30), colour=(200, 10, 10), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else (*colour, 128)).save(out, "PNG")
    return out.getvalue()


def wav_bytes(seconds: float, rate: int = 44_100, channels: int = 2) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    out = io.BytesIO()
    soundfile.write(out, np.stack([tone] * channels, axis=1), rate, format="WAV")
    return out.getvalue()


def test_an_image_file_is_read_as_rgb_with_its_hash(tmp_path):
    data = png_bytes(mode="RGBA")
    path = tmp_path / "red.png"
    path.write_bytes(data)
    item = media.load(str(path))
    assert item.kind == "image" and item.size == (40, 30)
    assert item.pixels.shape == (30, 40, 3) and item.pixels.dtype == np.uint8
    assert tuple(item.pixels[0, 0]) == (200, 10, 10)
    import hashlib

    assert item.sha256 == hashlib.sha256(data).hexdigest()
    assert item.describe() == "red.png (40x30 image)" and item.note == ""


def test_a_data_url_reads_like_a_file():
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    item = media.load(url)
    assert item.kind == "image" and item.size == (40, 30)
    assert item.source.startswith("data:image/png") and len(item.source) < 30
    with pytest.raises(MediaError, match="base64"):
        media.load("data:image/png;base64,***")


def test_a_huge_jpeg_is_decoded_small(tmp_path):
    # 100 megapixels: decoded at a reduced scale, never held whole.
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (10_000, 10_000), (20, 120, 220)).save(path, quality=50)
    item = media.load(str(path))
    assert max(item.size) <= media.MAX_SIDE
    assert "downscaled from 10000x10000" in item.note
    assert abs(int(item.pixels[5, 5, 2]) - 220) < 8


def test_bad_images_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really" * 10)
    for source, words in [(str(junk), "not an image"), (str(tmp_path / "none.png"), "no such file"),
                          ("https://example.com/a.png", "network is off"),
                          ("ftp://host/a.png", "only file paths")]:
        with pytest.raises(MediaError, match=words) as info:
            media.load(source)
        assert "\n" not in str(info.value)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        media.load(str(empty))


def test_audio_is_mono_16khz_and_bounded(tmp_path):
    path = tmp_path / "tone.wav"
    path.write_bytes(wav_bytes(1.5))
    item = media.load(str(path))
    assert item.kind == "audio" and item.samples.dtype == np.float32
    assert item.samples.ndim == 1 and abs(item.seconds - 1.5) < 0.01
    assert "resampled from 44100 Hz to 16000 Hz" in item.note and "mixed 2 channels" in item.note
    # The 440 Hz tone survives resampling: its spectrum peaks there.
    spectrum = np.abs(np.fft.rfft(item.samples))
    assert abs(np.argmax(spectrum) * media.SAMPLE_RATE / len(item.samples) - 440) < 2
    long = tmp_path / "lecture.wav"
    long.write_bytes(wav_bytes(600, rate=8000, channels=1))
    with pytest.raises(MediaError, match=r"600 s long.*at most 30 s"):
        media.load(str(long))
    with pytest.raises(MediaError, match="not audio"):
        media.load("data:audio/wav;base64," + base64.b64encode(b"RIFFnonsenseWAVE").decode())


def test_a_changed_file_is_refused_on_resume(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    first = media.load(str(path))
    path.write_bytes(png_bytes(colour=(0, 0, 0)))
    with pytest.raises(MediaError, match="has changed"):
        media.load(str(path), expect_sha256=first.sha256)


def test_media_keys_and_where_a_cache_may_be_cut():
    a, b = base.media_key("aa", 4), base.media_key("bb", 4)
    assert a < 0 and b < 0 and a != b and base.media_key("aa", 4) == a
    assert base.media_key("aa", 5) != a  # another token count is another key
    ids = [1, 2, 7, a, a, a, a, 8, a, a, a, a, a, a, a, a, 9]
    lengths = {a: 4}
    assert base.media_start(ids, 5, lengths) == 3  # inside the first picture: its start
    assert base.media_start(ids, 7, lengths) == 7  # the token after it
    assert base.media_start(ids, 14, lengths) == 12  # the second of two in a row
    assert base.media_start(ids, 2, lengths) == 2


class SeeingBackend(ScriptedBackend):
    """A scripted backend that takes pictures: 3 positions each, wrapped in ids 7 and 8."""

    def __init__(self):
        super().__init__()
        from dataclasses import replace

        self.info = replace(self.info, media=("image",))
        self.keys: dict[int, int] = {}

    def media_ids(self, item):
        key = base.media_key(item.sha256, 3)
        self.keys[key] = 3
        return [7, key, key, key, 8]

    def knows_media(self, token):
        return token in self.keys


def test_a_picture_goes_where_the_template_puts_it():
    picture = media.load("data:image/png;base64," + base64.b64encode(png_bytes()).decode())
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": media_content([picture], "What is it?")}]
    out = parts(messages)
    # Gemma 3's processor: the system prompt, then "\n\n" picture "\n\n", then the text.
    i = next(k for k, p in enumerate(out) if isinstance(p, MediaPart))
    assert out[i - 2:i + 3] == ["user\nBe brief.\n\n", "\n\n", "<start_of_image>", "\n\n",
                                "What is it?"]
    backend = SeeingBackend()
    prompts = PromptBuilder(backend)
    ids = prompts.chat(messages)
    key = base.media_key(picture.sha256, 3)
    assert ids.count(key) == 3 and ids[ids.index(key) - 1] == 7
    assert base.checked_prompt(backend, ids) == ids
    turn = prompts.user_turn("What is it?", first=True, system="Be brief.", media=[picture])
    assert turn == ids  # the chat's own turn is the same prompt
    with pytest.raises(InvalidMessages, match="do not hear audio"):
        GEMMA_TURNS.user_turn("x", first=True, system=None,
                              media=[media.Media("audio", "a.wav", "0" * 64)])


def test_a_text_only_model_says_which_models_see():
    backend = ScriptedBackend()
    picture = media.load("data:image/png;base64," + base64.b64encode(png_bytes()).decode())
    with pytest.raises(MediaError, match="does not take images.*Gemma 3 4B"):
        PromptBuilder(backend).chat([{"role": "user",
                                      "content": media_content([picture], "hi")}])


def test_openai_media_parts_are_read_and_checked():
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    audio = base64.b64encode(wav_bytes(0.5)).decode()
    out = openai_parts([{"type": "image_url", "image_url": {"url": url}},
                        {"type": "input_audio", "input_audio": {"data": audio,
                                                                "format": "wav"}},
                        {"type": "text", "text": "hi"}], 0, allow_remote=False)
    assert [p["type"] for p in out] == ["image", "audio", "text"]
    assert out[0]["media"].size == (40, 30) and abs(out[1]["media"].seconds - 0.5) < 0.01
    for bad, words in [({"type": "image_url", "image_url": {}}, "needs a url"),
                       ({"type": "input_audio", "input_audio": {"data": audio,
                                                                "format": "aiff"}}, "format"),
                       ({"type": "video_url"}, "content parts")]:
        with pytest.raises(APIError, match=words):
            openai_parts([bad], 0, allow_remote=False)
    with pytest.raises(MediaError, match="network is off"):
        openai_parts([{"type": "image_url", "image_url": {"url": "http://x/a.png"}}], 0,
                     allow_remote=False)


def test_ollama_images_become_picture_parts():
    b64 = base64.b64encode(png_bytes()).decode()
    messages = ollama.chat_messages({"messages": [{"role": "user", "content": "what?",
                                                   "images": [b64]}]})
    content = messages[0]["content"]
    assert content[0]["type"] == "image_url" and content[-1] == {"type": "text",
                                                                 "text": "what?"}
    assert openai_parts(content, 0, allow_remote=False)[0]["media"].size == (40, 30)
    with pytest.raises(APIError, match="only user messages"):
        ollama.chat_messages({"messages": [{"role": "assistant", "content": "x",
                                            "images": [b64]}]})
    with pytest.raises(APIError, match="base64 strings"):
        ollama.chat_messages({"messages": [{"role": "user", "content": "x", "images": [3]}]})
    with pytest.raises(APIError, match="raw"):
        ollama.unsupported({"images": [b64], "raw": True})
    json.dumps(messages[0]["content"])  # still plain JSON-able data


def test_a_text_only_model_keeps_the_text_of_earlier_pictures():
    """After /model to a model that reads text only, a chat with pictures goes on: earlier turns
    are sent without them, a new picture is refused on one line."""
    from gemma_chat.backends.base import SamplingParams, collect
    from gemma_chat.chat import Conversation

    picture = media.load("data:image/png;base64," + base64.b64encode(png_bytes()).decode())
    seeing = SeeingBackend().enqueue("A red square.", "Yes.")
    convo = Conversation(seeing)
    collect(convo.send("What is it?", SamplingParams(), media=[picture]))
    assert base.media_key(picture.sha256, 3) in seeing.prompts[-1]
    blind = ScriptedBackend().enqueue("Red.")
    convo.rebind(blind)
    text, _ = collect(convo.send("And its colour?", SamplingParams()))
    assert text == "Red." and all(t >= 0 for t in blind.prompts[-1])
    assert convo.exchanges[0].media == [picture]  # kept for a model that sees
    with pytest.raises(MediaError, match="does not take images"):
        collect(convo.send("And this one?", SamplingParams(), media=[picture]))


def test_media_spans_and_a_prefill_that_never_cuts_a_picture():
    from gemma_chat.backends.mlx import media_spans, prefill_step

    key, other = -5, -9
    ids = [2, 7, *[key] * 4, 8, *[key] * 4, *[key] * 4, 9, *[other] * 3, 1]
    assert media_spans(ids, {key: 4}) == [(2, 6), (7, 11), (11, 15)]  # twice in a row: each
    assert media_spans(ids, {key: 4, other: 3}) == [(2, 6), (7, 11), (11, 15), (16, 19)]
    spans = [(2, 6), (7, 11)]
    assert prefill_step(spans, len(ids), 2048) == 2048  # one call holds everything
    for step, expected in ((8, 7), (7, 7), (6, 6), (5, 6), (3, 6)):
        size = prefill_step(spans, len(ids), step)
        cuts = range(size, len(ids) - 1, size)
        assert size == expected and not any(a < k < b for a, b in spans for k in cuts)
    # A picture longer than the step: the smallest size above it that keeps it whole.
    assert prefill_step([(3, 300)], 400, 100) == 300
    assert prefill_step([], 10, 4) == 4
