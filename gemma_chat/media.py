"""Pictures and sound for the models that see and hear: read, checked and bounded once.

    picture = load("cat.jpg")              # Media(kind="image"): RGB pixels, H x W x 3 uint8
    clip = load("question.wav")            # Media(kind="audio"): mono float32 at 16 kHz
    picture = load("data:image/png;base64,...")
    picture = load("https://...", allow_remote=True)

A source is a file path, a ``data:`` URL or, only where the caller allows it, an http(s) URL.
Images are decoded with Pillow (EXIF rotation applied, converted to RGB as Hugging Face's
processors do) and never kept larger than :data:`MAX_SIDE` on their long side: a JPEG is decoded
straight at a reduced scale, so a 100-megapixel photo costs a few MB, not 300. Audio is decoded
with libsndfile (``soundfile``: wav, flac, ogg, mp3), mixed down to mono and resampled to 16 kHz
with libsoxr (``soxr``), the rate every Gemma audio encoder takes. Each item keeps the SHA-256 of
its original bytes: the KV cache and saved conversations know it by that.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidArgument, MissingDependency

KINDS = ("image", "audio")
SAMPLE_RATE = 16_000  # Gemma 3n's and Gemma 4's audio encoders
MAX_AUDIO_SECONDS = 30.0  # one clip: Gemma 3n and Gemma 4 hear at most 30 s at a time
MAX_SIDE = 2048  # an image's long side once read (the models see at most 896-1600 px)
MAX_BYTES = 256 * 2**20  # a media file or download
MAX_PIXELS = 400_000_000  # larger images are refused as decompression bombs
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus"}
SUFFIXES = IMAGE_SUFFIXES | AUDIO_SUFFIXES


class MediaError(InvalidArgument):
    """An image or audio file that cannot be read, or that the model cannot take."""


@dataclass(frozen=True, eq=False)
class Media:
    """One picture or sound clip, decoded."""

    kind: str  # "image" or "audio"
    source: str  # what the user gave (a path, a URL; a data URL shortened)
    sha256: str  # of the original bytes
    pixels: np.ndarray | None = None  # image: H x W x 3, uint8 RGB
    samples: np.ndarray | None = None  # audio: float32 mono at SAMPLE_RATE, in [-1, 1]
    note: str = ""  # what was done to it on the way in ("downscaled from ...")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of an image."""
        return (self.pixels.shape[1], self.pixels.shape[0]) if self.pixels is not None else (0, 0)

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE if self.samples is not None else 0.0

    @property
    def name(self) -> str:
        """A short name for messages: the file name, or the URL's."""
        if self.source.startswith("data:"):
            return f"the attached {self.kind}"
        tail = self.source.rstrip("/").rsplit("/", 1)[-1]
        return tail or self.source

    def describe(self) -> str:
        """``cat.jpg (1024x768 image)``, ``hello.wav (2.4 s of audio)``."""
        if self.kind == "image":
            w, h = self.size
            return f"{self.name} ({w}x{h} image)"
        return f"{self.name} ({self.seconds:.1f} s of audio)"

    def to_dict(self) -> dict[str, str]:
        """What a saved conversation keeps: where it came from and its hash."""
        return {"type": self.kind, "source": self.source, "sha256": self.sha256}


def processor_settings(folder: Path) -> dict:
    """A checkpoint's image processor settings (``preprocessor_config.json``, or the
    ``image_processor`` of ``processor_config.json``); empty when it has neither."""
    merged: dict = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(folder) / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                merged.update(data.get("image_processor", data))
    return merged


def looks_like_media(text: str) -> bool:
    """Whether ``text`` names a media file by its suffix (a path or URL)."""
    path = urllib.parse.urlparse(text).path if "://" in text else text
    return Path(path).suffix.lower() in SUFFIXES


def load(source: str, *, kind: str | None = None, allow_remote: bool = False,
         expect_sha256: str | None = None) -> Media:
    """Read ``source`` as an image or audio clip (``kind``, or guessed from its suffix and its
    bytes); :class:`MediaError` with one line when it cannot be used. With ``expect_sha256``
    (a resumed conversation), a file whose bytes changed is refused."""
    if kind is not None and kind not in KINDS:
        raise MediaError(f"unknown media kind {kind!r}: use image or audio")
    data, shown, suffix = _read(source, allow_remote)
    digest = hashlib.sha256(data).hexdigest()
    if expect_sha256 and digest != expect_sha256:
        raise MediaError(f"{shown} has changed since it was attached (its SHA-256 differs)")
    if kind is None:
        kind = "audio" if suffix in AUDIO_SUFFIXES else \
            "image" if suffix in IMAGE_SUFFIXES else _sniff(data)
    if kind == "image":
        pixels, note = _decode_image(data, shown)
        return Media("image", shown, digest, pixels=pixels, note=note)
    samples, note = _decode_audio(data, shown)
    return Media("audio", shown, digest, samples=samples, note=note)


def _read(source: str, allow_remote: bool) -> tuple[bytes, str, str]:
    """(bytes, the name to show, the suffix) of a path, data URL or http(s) URL."""
    if not isinstance(source, str) or not source.strip():
        raise MediaError("the media source is empty")
    source = source.strip()
    if source.startswith("data:"):
        return _data_url(source)
    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme in ("http", "https"):
        if not allow_remote:
            raise MediaError(f"{source[:80]}: fetching media from the network is off "
                             "(gemma serve --allow-remote-media turns it on)")
        return _download(source), source, Path(urllib.parse.urlparse(source).path).suffix.lower()
    if scheme == "file":
        source = urllib.parse.unquote(urllib.parse.urlparse(source).path)
    elif "://" in source:
        raise MediaError(f"{source[:80]}: only file paths, data: URLs and http(s) URLs are read")
    path = Path(source).expanduser()
    if not path.is_file():
        raise MediaError(f"no such file: {source}" if not path.exists() else
                         f"{source} is not a file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise MediaError(f"{path.name} is {size / 2**20:.0f} MB; media files are read up to "
                         f"{MAX_BYTES // 2**20} MB")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read {source}: {exc.strerror or exc}") from None
    if not data:
        raise MediaError(f"{path.name} is empty")
    return data, str(path), path.suffix.lower()


def _data_url(url: str) -> tuple[bytes, str, str]:
    head, sep, body = url.partition(",")
    if not sep:
        raise MediaError("a data: URL needs a comma before its data")
    mime = head[5:].split(";")[0].lower()
    try:
        data = base64.b64decode(body, validate=True) if head.endswith(";base64") \
            else urllib.parse.unquote_to_bytes(body)
    except (binascii.Error, ValueError):
        raise MediaError("a data: URL's base64 data is malformed") from None
    if not data:
        raise MediaError("a data: URL holds no data")
    if len(data) > MAX_BYTES:
        raise MediaError(f"a data: URL holds {len(data) / 2**20:.0f} MB; media is read up to "
                         f"{MAX_BYTES // 2**20} MB")
    suffix = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp",
              "image/gif": ".gif", "audio/wav": ".wav", "audio/x-wav": ".wav",
              "audio/mpeg": ".mp3", "audio/mp3": ".mp3", "audio/flac": ".flac",
              "audio/ogg": ".ogg"}.get(mime, "")
    return data, f"data:{mime or 'application/octet-stream'},…", suffix


def _download(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "gemma-chat"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:  # noqa: S310 - http(s) only
            data = response.read(MAX_BYTES + 1)
    except OSError as exc:
        raise MediaError(f"could not fetch {url[:80]}: {getattr(exc, 'reason', exc)}") from None
    if len(data) > MAX_BYTES:
        raise MediaError(f"{url[:80]} is over {MAX_BYTES // 2**20} MB")
    return data


def _sniff(data: bytes) -> str:
    """image or audio, from the first bytes (RIFF/WAVE, fLaC, OggS, ID3 or an MPEG frame)."""
    head = data[:12]
    if (head[:4] == b"RIFF" and head[8:12] == b"WAVE") or head[:4] in (b"fLaC", b"OggS") \
            or head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio"
    return "image"


def _decode_image(data: bytes, shown: str) -> tuple[np.ndarray, str]:
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise MissingDependency("Pillow is not installed: pip install pillow") from None
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    name = shown if shown.startswith("data:") else Path(shown).name
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            # JPEG decodes at 1/2, 1/4 or 1/8 scale directly: memory stays bounded.
            image.draft("RGB", (MAX_SIDE, MAX_SIDE))
            image.load()
            image = ImageOps.exif_transpose(image)
            image = image.convert("RGB")
    except Image.DecompressionBombError:
        raise MediaError(f"{name} is over {MAX_PIXELS // 1_000_000} megapixels; "
                         "refused as too large to decode safely") from None
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow raises UnidentifiedImageError (an OSError) for what it cannot read at all.
        reason = "not an image gemma-chat can read" if "identify" in str(exc) else str(exc)
        raise MediaError(f"{name}: {reason} (PNG, JPEG, WebP, GIF, BMP and TIFF are)") \
            from None
    note = ""
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    if image.size != (width, height):
        note = f"downscaled from {width}x{height} to {image.size[0]}x{image.size[1]}"
    return np.asarray(image, dtype=np.uint8).copy(), note


def _decode_audio(data: bytes, shown: str) -> tuple[np.ndarray, str]:
    try:
        import soundfile
        import soxr
    except ImportError:
        raise MissingDependency("soundfile and soxr are not installed: pip install soundfile "
                                "soxr") from None
    name = shown if shown.startswith("data:") else Path(shown).name
    try:
        info = soundfile.info(io.BytesIO(data))
        seconds = info.frames / info.samplerate if info.samplerate else 0.0
        if seconds > MAX_AUDIO_SECONDS:
            raise MediaError(
                f"{name} is {seconds:.0f} s long; Gemma's audio models hear at most "
                f"{MAX_AUDIO_SECONDS:.0f} s at a time: cut it into clips "
                f"(e.g. sox {name} part.wav trim 0 {MAX_AUDIO_SECONDS:.0f})")
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except MediaError:
        raise
    except (RuntimeError, ValueError, TypeError, soundfile.LibsndfileError) as exc:
        raise MediaError(f"{name}: not audio gemma-chat can read ({exc}; WAV, FLAC, OGG and "
                         "MP3 are)") from None
    if samples.size == 0:
        raise MediaError(f"{name} holds no sound")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    note = ""
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
        note = f"resampled from {rate} Hz to {SAMPLE_RATE} Hz"
    if samples.shape[1] > 1:
        note = ", ".join(filter(None, [f"mixed {samples.shape[1]} channels to mono", note]))
    return np.clip(np.asarray(mono, dtype=np.float32), -1.0, 1.0), note
