"""Pictures and sound into a llama.cpp context, through llama.cpp's multimodal library (mtmd).

    projector = Projector(Path("mmproj-gemma-3-4b-it-f16.gguf"), llm, threads=8)
    piece = projector.piece(media)     # the ids around it and its token count
    n_past = projector.evaluate(media, n_past, seq_id=0)

A model's image (and audio) encoder lives in a projector GGUF of its own (``mmproj-*.gguf``).
For each picture or clip, mtmd preprocesses it, runs the encoder and decodes the resulting
embeddings into the KV cache at the given position, with bidirectional attention over the image
where the model wants it (Gemma 3): the whole image must then be one ubatch, which is why the
context's ``n_ubatch`` is at least :attr:`Projector.max_tokens`. mtmd also writes the tokens that
wrap a medium (``<start_of_image>`` ... ``<end_of_image>``, Gemma 4's ``<|image>`` ...
``<image|>``) itself: :meth:`Projector.piece` returns them as ids around the medium's own
positions, so a prompt holds them as ordinary tokens.

Media are handed to mtmd as decoded pixels (RGB) or 16 kHz samples, each with the SHA-256 of its
source as its id. Gemma 3's processor squashes a picture to its square input size; mtmd would
keep the aspect ratio and pad, so pictures are resized here first, as the processor does.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendError
from ..media import Media, MediaError

try:
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd
except ImportError:  # pragma: no cover - where the extra is missing
    mtmd = None

#: The ubatch (and batch) a context with a projector gets, at least: a Gemma 3 picture is 256
#: tokens and Gemma 4's default budget 280, each decoded in one ubatch.
MEDIA_UBATCH = 512

#: Gemma 4's picture budget in tokens (its processor offers 70, 140, 280, 560 and 1120; 280 is
#: its default). Pictures with small print read better at 560 or 1120.
IMAGE_TOKENS = 280
IMAGE_BUDGETS = (70, 140, 280, 560, 1120)

#: The marker that stands for a medium in the text given to mtmd: never in user text, because
#: only the medium itself is ever tokenized with it.
_MARKER = b"<__gemma_chat_media__>"


@dataclass(frozen=True)
class Piece:
    """How one medium appears in a prompt: ``before`` ids, ``n_tokens`` positions of its own
    embeddings, then ``after`` ids."""

    before: tuple[int, ...]
    n_tokens: int
    after: tuple[int, ...]


def projector_kinds(path: Path) -> tuple[str, ...]:
    """What a projector GGUF encodes ("image", "audio"), read from its header."""
    from ..gguf_file import read_gguf

    meta = read_gguf(path).metadata
    kinds = []
    if meta.get("clip.has_vision_encoder"):
        kinds.append("image")
    if meta.get("clip.has_audio_encoder"):
        kinds.append("audio")
    return tuple(kinds)


def describe_projector(path: Path) -> str:
    """What a projector takes and what that costs in context, for ``gemma show``."""
    from ..gguf_file import read_gguf

    meta = read_gguf(path).metadata
    kind = str(meta.get("clip.projector_type") or meta.get("clip.vision.projector_type") or "")
    parts = []
    if meta.get("clip.has_vision_encoder"):
        if kind == "gemma4v":
            parts.append(f"pictures (up to {IMAGE_TOKENS} tokens each; --image-tokens)")
        else:
            size, patch = meta.get("clip.vision.image_size"), meta.get("clip.vision.patch_size")
            scale = meta.get("clip.vision.projector.scale_factor") or 4
            if kind == "gemma3" and size and patch:
                parts.append(f"pictures ({(int(size) // int(patch) // int(scale)) ** 2} tokens "
                             "each)")
            else:
                parts.append("pictures")
    if meta.get("clip.has_audio_encoder"):
        parts.append("sound (25 tokens a second, 30 s a clip)")
    return " and ".join(parts) or "nothing it can read"


def projector_image_size(path: Path) -> int:
    from ..gguf_file import read_gguf

    return int(read_gguf(path).metadata.get("clip.vision.image_size") or 0)


class Projector:
    """An mtmd context on a projector GGUF, bound to one loaded llama.cpp model."""

    def __init__(self, path: Path, model, *, threads: int, use_gpu: bool, verbose: bool = False,
                 image_tokens: int = IMAGE_TOKENS):
        if mtmd is None:
            raise BackendError("this llama-cpp-python has no multimodal library (mtmd)")
        _quiet(verbose)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = threads
        params.print_timings = verbose
        params.warmup = False
        params.media_marker = _MARKER
        # Gemma 4 sizes a picture to a token budget: Hugging Face's processor's default.
        params.image_max_tokens = image_tokens
        # No minimum of its own: pictures come sized as the processor sizes them, which may
        # be under llama.cpp's default floor of 70 tokens for a long, thin one.
        params.image_min_tokens = 1
        self.path = Path(path)
        self._ctx = mtmd.mtmd_init_from_file(str(path).encode(), model, params)
        if not self._ctx:
            raise BackendError(f"llama.cpp could not load the projector {self.path.name} with "
                               "this model (a projector made for another model?)")
        self.kinds = tuple(k for k, ok in (("image", mtmd.mtmd_support_vision(self._ctx)),
                                           ("audio", mtmd.mtmd_support_audio(self._ctx))) if ok)
        self.sample_rate = int(mtmd.mtmd_get_audio_sample_rate(self._ctx))
        self.image_size = projector_image_size(self.path)
        self.image_tokens = image_tokens
        self.n_embd = int(llama_cpp.llama_model_n_embd_inp(model))  # what a medium becomes
        kind = self._projector_type()
        self.square = kind in ("gemma3", "gemma3nv")  # a fixed square input (Gemma 3, 3n)
        self.budgeted = kind == "gemma4v"  # a token budget (Gemma 4)
        self._pieces: dict[str, Piece] = {}

    def _projector_type(self) -> str:
        from ..gguf_file import read_gguf

        meta = read_gguf(self.path).metadata
        return str(meta.get("clip.projector_type") or meta.get("clip.vision.projector_type")
                   or "")

    # -- one medium ----------------------------------------------------------------------

    def _bitmap(self, media: Media):
        if media.kind == "image":
            pixels = media.pixels
            if self.square and self.image_size and pixels.shape[:2] != (self.image_size,) * 2:
                pixels = squash(pixels, self.image_size)
            elif self.budgeted:  # Gemma 4: to the budget as its processor sizes it
                pixels = fit_budget(pixels, self.image_tokens)
            h, w = pixels.shape[:2]
            data = np.ascontiguousarray(pixels, dtype=np.uint8)
            bitmap = mtmd.mtmd_bitmap_init(w, h, data.ctypes.data_as(
                ctypes.POINTER(ctypes.c_uint8)))
        else:
            samples = np.ascontiguousarray(media.samples, dtype=np.float32)
            bitmap = mtmd.mtmd_bitmap_init_from_audio(
                len(samples), samples.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        if not bitmap:
            raise MediaError(f"llama.cpp could not take {media.describe()}")
        mtmd.mtmd_bitmap_set_id(bitmap, media.sha256.encode())
        return bitmap

    def _chunks(self, media: Media):
        """mtmd's chunks for the medium alone: text (its opening), the medium, text."""
        if media.kind not in self.kinds:
            raise MediaError(f"this model's projector does not take {media.kind}")
        bitmap = self._bitmap(media)
        chunks = mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = \
            _MARKER, len(_MARKER), False, True
        try:
            rc = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text),
                                    (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        if rc != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise MediaError(f"llama.cpp could not preprocess {media.describe()} (error {rc})")
        return chunks

    def piece(self, media: Media) -> Piece:
        """The ids around ``media`` and its number of positions (remembered by hash)."""
        piece = self._pieces.get(media.sha256)
        if piece is not None:
            return piece
        chunks = self._chunks(media)
        try:
            before, after, n_tokens, seen = [], [], 0, False
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    (after if seen else before).extend(ptr[j] for j in range(n.value))
                elif seen:
                    raise MediaError(f"{media.describe()} is more than one piece for llama.cpp "
                                     "(a clip over 30 s?)")
                else:
                    seen, n_tokens = True, mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        piece = self._pieces[media.sha256] = Piece(tuple(before), n_tokens, tuple(after))
        return piece

    @contextlib.contextmanager
    def _media_chunk(self, media: Media):
        """mtmd's chunk of the medium itself (freed on leaving)."""
        chunks = self._chunks(media)
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    yield chunk
                    return
            raise BackendError(f"llama.cpp made no embeddings of {media.describe()}")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def evaluate(self, llama_ctx, media: Media, n_past: int, seq_id: int, n_batch: int) -> int:
        """Encode ``media`` and decode its embeddings at position ``n_past`` of ``seq_id``;
        return the position after it."""
        with self._media_chunk(media) as chunk:
            new_past = llama_cpp.llama_pos(n_past)
            rc = mtmd.mtmd_helper_eval_chunk_single(self._ctx, llama_ctx, chunk, n_past, seq_id,
                                                    n_batch, False, ctypes.byref(new_past))
            if rc != 0:
                raise BackendError(f"llama.cpp failed to encode {media.describe()} (error {rc})")
            return int(new_past.value)

    def embeddings(self, media: Media) -> np.ndarray:
        """The medium's embeddings as the text model receives them: (n_tokens, width)."""
        with self._media_chunk(media) as chunk:
            if mtmd.mtmd_encode_chunk(self._ctx, chunk) != 0:
                raise BackendError(f"llama.cpp failed to encode {media.describe()}")
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            flat = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self._ctx),
                                         shape=(n * self.n_embd,))
            return flat.reshape(n, self.n_embd).copy()

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            mtmd.mtmd_free(self._ctx)
            self._ctx = None

    def __del__(self):  # pragma: no cover - interpreter shutdown
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def image_budget(image_tokens: int | None) -> int:
    """Gemma 4's picture budget for ``--image-tokens`` (the default where None)."""
    from ..errors import InvalidArgument

    if image_tokens is not None and image_tokens not in IMAGE_BUDGETS:
        raise InvalidArgument(f"invalid --image-tokens {image_tokens}: Gemma 4 takes "
                              f"{', '.join(map(str, IMAGE_BUDGETS))}")
    return image_tokens or IMAGE_TOKENS


def budget_size(height: int, width: int, tokens: int, patch: int = 16,
                pool: int = 3) -> tuple[int, int]:
    """(height, width) Gemma 4's processor gives a picture for a budget of ``tokens``: the
    largest with the same aspect ratio, sides in multiples of ``pool * patch`` (48 px), and at
    most ``tokens`` pooled patches (small pictures are enlarged)."""
    max_patches = tokens * pool * pool
    factor = math.sqrt(max_patches * patch * patch / (height * width))
    side = pool * patch
    h, w = int(factor * height / side) * side, int(factor * width / side) * side
    longest = (max_patches // pool ** 2) * side
    if h == 0 and w == 0:
        raise MediaError(f"a {width}x{height} picture is too small to see")
    if h == 0:
        h, w = side, min(int(width / height) * side, longest)
    elif w == 0:
        h, w = min(int(height / width) * side, longest), side
    return h, w


def fit_budget(pixels: np.ndarray, tokens: int) -> np.ndarray:
    """Resize to :func:`budget_size`, bicubic, as Gemma 4's processor does."""
    from PIL import Image

    h, w = budget_size(pixels.shape[0], pixels.shape[1], tokens)
    if (h, w) == pixels.shape[:2]:
        return pixels
    image = Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def squash(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size``, bilinear, as Gemma 3's processor does (no aspect ratio)."""
    from PIL import Image

    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


_LOG = {"verbose": False, "callback": None}


def _quiet(verbose: bool) -> None:
    """mtmd logs every image it encodes: only to stderr when verbose. One callback for the
    process: llama.cpp's vision code keeps the pointer it was given, so a callback must never
    be freed."""
    _LOG["verbose"] = verbose
    if _LOG["callback"] is None:
        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):  # noqa: ARG001
            if _LOG["verbose"]:
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _LOG["callback"] = callback
        mtmd.mtmd_log_set(callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
