"""A model on a server that speaks OpenAI's chat-completions API: vLLM, llama.cpp's
llama-server, llama-cpp-python's server, Ollama's ``/v1``, LM Studio, and ``gemma serve``.

    backend = RemoteBackend("http://gpu-box:8000/v1", "31b-it", api_key=None)
    for chunk in backend.chat([{"role": "user", "content": "Hi"}], SamplingParams()):
        print(chunk.text, end="")

The server renders the chat template and owns the KV cache, so this backend works on messages,
not token ids: :meth:`RemoteBackend.chat` is its streaming primitive (the chat, ``gemma run`` and
``gemma bench --url`` consume it), and what only a local engine can do (count tokens before
sending, save the KV cache) raises :class:`~gemma_chat.errors.BackendError` with a line that says
so. Thoughts come from the delta's ``reasoning_content`` (vLLM, llama-server, gemma serve) or
``reasoning`` (Ollama, newer vLLM), or, from a server that sends them as raw text, from the
``<think>`` or Gemma 4 ``<|channel>thought`` markers in the content. The HTTP client is the
official ``openai`` package: it parses the event stream, and closing it (Ctrl-C) closes the
connection, which vLLM, llama-server and gemma serve take as the signal to stop generating.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import BackendError, ContextOverflow, GemmaChatError, ModelNotFound, missing_extra
from .base import BackendBase, Chunk, ModelInfo, SamplingParams, Stats, describe_sampler

#: Seconds to wait for a connection: an unreachable server is reported within them.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for the next piece of a reply (a big model's prefill can take minutes).
READ_TIMEOUT = 600.0
#: The context assumed when the server does not say (only for the meter; the server enforces).
UNKNOWN_CTX = 0

#: Where each server takes the sampling settings OpenAI's API lacks. Sent every time, so a
#: server's own defaults (llama-cpp-python's repeat_penalty 1.1, top_k 40) never apply silently.
#: vLLM reads top_k, min_p and repetition_penalty; llama-server, llama-cpp-python, LM Studio and
#: gemma serve read top_k, min_p and repeat_penalty; Ollama's /v1 reads none of them.
EXTRA_SAMPLING = ("top_k", "min_p", "repeat_penalty", "repetition_penalty")

#: Text markers of a thought channel, for servers that send thoughts inside the content.
THOUGHT_TAGS = (("<think>", "</think>"), ("<|channel>thought\n", "<channel|>"),
                ("<|channel>thought", "<channel|>"))


class StreamDropped(BackendError):
    """The server ended the stream before the reply finished (the partial reply is kept)."""


def api_url(url: str) -> str:
    """The API base for a server URL: ``http://host:8000`` becomes ``http://host:8000/v1``
    (every server we know serves OpenAI's API there); a URL with a path is kept as it is."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BackendError(f"--url must be an http(s) URL such as http://localhost:8000/v1, "
                           f"not {url!r}")
    return url if parts.path not in ("", "/") else url + "/v1"


def _client(url: str, api_key: str | None):
    try:
        import httpx
        import openai
    except ImportError:  # pragma: no cover - openai is a dependency of the remote extra
        raise missing_extra("openai", "remote") from None
    return openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=0,
                         timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT))


def api_error(exc: Exception, url: str, model: str | None = None) -> GemmaChatError:
    """One line for what went wrong between us and the server."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return BackendError(f"{url} did not answer in time ({exc.__cause__ or exc})")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return BackendError(f"cannot reach {url}: {_reason(cause)}; is the server running?")
    if isinstance(exc, openai.AuthenticationError):
        return BackendError(f"{url} refused the request (401 Unauthorized): give the server's "
                            "key with --api-key or GEMMA_API_KEY")
    if isinstance(exc, openai.PermissionDeniedError):
        return BackendError(f"{url} refused the request (403 Forbidden): {_message(exc)}")
    if isinstance(exc, openai.NotFoundError) and model is not None:
        return ModelNotFound(f"{url} does not serve {model!r} ({_message(exc)})")
    if isinstance(exc, openai.APIStatusError):
        message = _message(exc)
        if exc.status_code == 400 and any(w in message.lower() for w in
                                          ("context", "too long", "maximum", "exceed")):
            return ContextOverflow(f"the server refused the conversation: {message}")
        return BackendError(f"{url} answered {exc.status_code}: {message}")
    if isinstance(exc, openai.APIError):
        return BackendError(f"{url}: {_message(exc)}")
    return BackendError(f"{url}: {exc}")


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    for known, said in (("Connection refused", "connection refused"),
                        ("Name or service not known", "unknown host"),
                        ("nodename nor servname", "unknown host"),
                        ("timed out", "timed out")):
        if known in text:
            return said
    return text.splitlines()[0]


def _message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"]).splitlines()[0]
        if isinstance(inner, str):
            return inner.splitlines()[0]
        if body.get("detail"):
            return str(body["detail"]).splitlines()[0]
    return (getattr(exc, "message", None) or str(exc)).splitlines()[0]


# -- model names -------------------------------------------------------------------------------

_SUFFIXES = ("-gguf", ".gguf", "-4bit", "-8bit", "-bf16", "-f16", "-f32", "-q4_0", "-q4_k_m",
             "-q8_0", "-qat", "-qat-q4_0")


def _stem(served: str) -> str:
    """A served id's model part: a path's or repo's last piece, Ollama's ``:latest`` dropped."""
    name = served.strip().lower().rstrip("/").rsplit("/", 1)[-1]
    return name[:-len(":latest")] if name.endswith(":latest") else name


def _bare(name: str) -> str:
    """``name`` without the quantization and format suffixes a file or repo adds."""
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name, changed = name[:-len(suffix)], True
    return name


def _names_of(spec) -> set[str]:
    """Every name a catalogue model may be served under."""
    names = {spec.name, *spec.aliases, spec.hf_repo}
    for source in (*spec.gguf.values(), *spec.mlx.values()):
        names.add(source.repo)
        if source.file:
            names.add(source.file)
    return {_bare(_stem(n)) for n in names} | {n.lower() for n in names}


def match_model(requested: str | None, served: Sequence[str], where: str) -> str:
    """The server's id for ``requested``: the id itself, or the id a catalogue name (``31b-it``)
    is served under (``google/gemma-4-31B-it``, ``gemma4:31b``, ``gemma-4-31B-it-Q4_K_M.gguf``);
    with no name, the one model the server has. Otherwise :class:`ModelNotFound` listing what
    the server serves."""
    if not served:
        raise ModelNotFound(f"{where} serves no models")
    if requested is None or not requested.strip():
        cards = {getattr(_spec_for(None, sid), "name", None) for sid in served}
        if len(served) == 1 or (len(cards) == 1 and None not in cards):
            return served[0]  # one model (gemma serve lists its aliases too)
        raise ModelNotFound(f"{where} serves {len(served)} models; pick one with -m: "
                            f"{', '.join(served)}")
    wanted = requested.strip()
    for sid in served:
        if sid == wanted:
            return sid
    for sid in served:
        if sid.lower() == wanted.lower() or _stem(sid) == wanted.lower():
            return sid
    from .. import catalog

    spec = catalog.load().get(wanted)
    if spec is not None:
        names = _names_of(spec)
        hits = [sid for sid in served if sid.lower() in names or _stem(sid) in names
                or _bare(_stem(sid)) in names]
        if hits:
            return hits[0]
    raise ModelNotFound(f"{where} does not serve {wanted!r}; it serves: {', '.join(served)}")


def served_models(client, where: str) -> list[dict]:
    """The server's ``/v1/models`` entries (id plus whatever else it says)."""
    try:
        page = client.models.list()
    except Exception as exc:  # noqa: BLE001 - mapped to one line
        import openai

        if isinstance(exc, openai.NotFoundError):
            raise BackendError(f"{where} has no /models endpoint (404): give the URL of its "
                               "OpenAI API, which usually ends in /v1") from None
        raise api_error(exc, where) from None
    return [m.model_dump() for m in page.data]


def _context_of(entry: Mapping) -> int:
    """The context a ``/v1/models`` entry states: vLLM's ``max_model_len``, llama-server's
    ``meta.n_ctx_train`` or gemma serve's ``context_length``; 0 when it says nothing."""
    for key in ("max_model_len", "context_length"):
        if isinstance(entry.get(key), int):
            return entry[key]
    meta = entry.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("n_ctx_train"), int):
        return meta["n_ctx_train"]
    return UNKNOWN_CTX


# -- messages and requests ---------------------------------------------------------------------

def openai_content(content: object) -> object:
    """A message's content as OpenAI's API takes it: our picture and clip parts (decoded
    :class:`~gemma_chat.media.Media`) become ``image_url`` data URLs and ``input_audio``."""
    if not isinstance(content, list):
        return content
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image" and "media" in part:
            from PIL import Image

            buffer = io.BytesIO()
            Image.fromarray(part["media"].pixels).save(buffer, format="PNG")
            data = base64.b64encode(buffer.getvalue()).decode()
            out.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
        elif kind == "audio" and "media" in part:
            import soundfile

            from ..media import SAMPLE_RATE

            buffer = io.BytesIO()
            soundfile.write(buffer, part["media"].samples, SAMPLE_RATE, format="WAV")
            out.append({"type": "input_audio", "input_audio": {
                "data": base64.b64encode(buffer.getvalue()).decode(), "format": "wav"}})
        else:
            out.append(part)
    return out


def request_body(model: str, messages: Sequence[Mapping], sampling: SamplingParams, *,
                 thinking: bool | None = None, response_format: dict | None = None) -> dict:
    """The chat-completions request for ``messages`` with our sampling settings. Thinking is
    asked for as vLLM, llama-server and gemma serve take it (``chat_template_kwargs``) and as
    Ollama takes it (``reasoning_effort``); ``None`` leaves it to the server."""
    body: dict = {
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{**m, "content": openai_content(m.get("content"))} for m in messages],
        "temperature": sampling.temperature, "top_p": sampling.top_p,
        "top_k": sampling.top_k, "min_p": sampling.min_p,
        "repeat_penalty": sampling.repeat_penalty,
        "repetition_penalty": sampling.repeat_penalty,
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.max_tokens is not None:
        body["max_tokens"] = sampling.max_tokens
    if thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": thinking}
        if thinking:
            body["reasoning_effort"] = "medium"
    if response_format is not None:
        body["response_format"] = response_format
    return body


class ThoughtTags:
    """Thoughts a server sends as raw text in the content (``<think>...</think>`` or Gemma 4's
    ``<|channel>thought ... <channel|>``), split out as they stream; a marker cut across two
    pieces is held back until it is whole."""

    def __init__(self):
        self.inside: tuple[str, str] | None = None
        self.held = ""

    def feed(self, text: str) -> list[tuple[str, bool]]:
        """Pieces of ``text`` as (text, is_thought)."""
        text, self.held = self.held + text, ""
        out: list[tuple[str, bool]] = []
        while text:
            if self.inside is None:
                hit = min(((text.find(o), (o, c)) for o, c in THOUGHT_TAGS if o in text),
                          default=None, key=lambda h: (h[0], -len(h[1][0])))
                if hit is None:
                    keep = self._partial(text, [o for o, _ in THOUGHT_TAGS])
                    out.append((text[:len(text) - keep], False))
                    self.held = text[len(text) - keep:]
                    break
                at, tags = hit
                out.append((text[:at], False))
                text, self.inside = text[at + len(tags[0]):], tags
            else:
                close = self.inside[1]
                at = text.find(close)
                if at < 0:
                    keep = self._partial(text, [close])
                    out.append((text[:len(text) - keep], True))
                    self.held = text[len(text) - keep:]
                    break
                out.append((text[:at], True))
                text, self.inside = text[at + len(close):].lstrip("\n"), None
        return [(t, thought) for t, thought in out if t]

    def flush(self) -> list[tuple[str, bool]]:
        held, self.held = self.held, ""
        return [(held, self.inside is not None)] if held else []

    @staticmethod
    def _partial(text: str, markers: list[str]) -> int:
        """How many characters at the end of ``text`` may start one of ``markers``."""
        best = 0
        for marker in markers:
            for n in range(min(len(marker) - 1, len(text)), 0, -1):
                if marker.startswith(text[-n:]):
                    best = max(best, n)
                    break
        return best


class _ServerFormat:
    name = "server"
    description = "the server's own chat template (it renders the conversation)"
    thought_channel = None
    revision = ""


class ServerPrompts:
    """What a conversation asks of its prompt builder, for a model whose server renders the
    template. Whether it can think follows the catalogue card where the served name tells it;
    for a model we do not know, the switch is sent and the server decides."""

    format = _ServerFormat()
    thought_ids = None

    def __init__(self, backend):
        from ..family import GEMMA

        self.backend = backend
        spec = getattr(backend, "spec", None)
        arch = GEMMA.get(spec.arch) if spec is not None else None
        self.can_think = arch.thinks if arch is not None else spec is None


def _spec_for(requested: str | None, served: str):
    """The catalogue card of a served model, where its name or id tells it."""
    from .. import catalog

    cards = catalog.load()
    for name in (requested, served, _stem(served), _bare(_stem(served))):
        spec = cards.get(name) if name else None
        if spec is not None:
            return spec
    return cards.by_repo(served)


# -- the backend -------------------------------------------------------------------------------

class RemoteBackend(BackendBase):
    """A model served over OpenAI's chat-completions API; see the module docstring."""

    name = "openai"
    remote = True

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None):
        self.url = api_url(url)
        self._api_key = api_key
        self.client = _client(self.url, api_key)
        entries = served_models(self.client, self.url)
        ids = [str(e.get("id")) for e in entries if e.get("id")]
        self.model = match_model(model, ids, self.url)
        entry = next(e for e in entries if e.get("id") == self.model)
        n_ctx = _context_of(entry)
        self.spec = spec = _spec_for(model, self.model)
        media = tuple(k for k in ("image", "audio") if spec is None or k in spec.modalities)
        self.info = ModelInfo(
            name=self.model, path=Path(self.url), backend=self.name,
            architecture=spec.arch if spec is not None else "remote",
            quantization="on the server", n_ctx=n_ctx, n_ctx_train=n_ctx, n_vocab=0,
            n_params=int(spec.params_b * 1e9) if spec is not None else 0,
            instruction_tuned=True, bos_id=-1, eos_id=-1, end_of_turn_id=None,
            device=urlsplit(self.url).netloc, media=media)
        self.served = ids
        self.notes: list[str] = []

    @property
    def identity(self) -> str:
        """What a saved conversation records to know the same model again."""
        return f"{self.url}#{self.model}"

    def switch(self, model: str) -> RemoteBackend:
        """The same server, another of its models (``/model`` in the chat)."""
        other = object.__new__(RemoteBackend)
        other.__dict__.update(self.__dict__)
        other.client = _client(self.url, self._api_key)  # closing this one leaves it open
        entries = served_models(self.client, self.url)
        other.model = match_model(model, [str(e.get("id")) for e in entries], self.url)
        other.spec = _spec_for(model, other.model)
        other.info = ModelInfo(**{**self.info.to_dict(), "name": other.model,
                                  "path": Path(self.url)})
        return other

    # -- the streaming primitive --

    def chat(self, messages: Sequence[Mapping], sampling: SamplingParams, *,
             thinking: bool | None = None, cancel: threading.Event | None = None,
             response_format: dict | None = None) -> Iterator[Chunk]:
        """Stream the server's reply to ``messages`` (OpenAI-style; the server renders them
        with its template). Thought chunks are marked; the last chunk carries :class:`Stats`
        from the server's ``usage`` where it sends one (else counted here: one token per
        streamed piece) and timings measured here. Closing the iterator, or ``cancel``, closes
        the connection. A stream that ends before the reply does raises
        :class:`StreamDropped` after the chunks that came."""
        body = request_body(self.model, messages, sampling, thinking=thinking,
                            response_format=response_format)
        start = time.perf_counter()
        stats = Stats(sampler=describe_sampler(sampling) + " (on the server)")
        try:
            stream = self.client.chat.completions.create(
                **{k: body[k] for k in ("model", "messages", "stream", "stream_options")},
                extra_body={k: v for k, v in body.items()
                            if k not in ("model", "messages", "stream", "stream_options")})
        except Exception as exc:  # noqa: BLE001 - mapped to one line
            raise api_error(exc, self.url, self.model) from None
        tags = ThoughtTags()
        first = last = thought_end = None
        pieces = thought_pieces = 0
        finish = None
        usage = None

        def chunk(text: str, thought: bool) -> Chunk:
            nonlocal first, last, pieces, thought_pieces, thought_end
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            pieces += 1
            if thought:
                thought_pieces += 1
                thought_end = now
            return Chunk(text, thought=thought)

        try:
            for event in self._events(stream):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if getattr(event, "usage", None) is not None:
                    usage = event.usage
                for choice in event.choices or ():
                    delta = choice.delta
                    extra = getattr(delta, "model_extra", None) or {}
                    thought = extra.get("reasoning_content") or extra.get("reasoning")
                    if thought:
                        yield chunk(thought, True)
                    if delta is not None and delta.content:
                        for text, is_thought in tags.feed(delta.content):
                            yield chunk(text, is_thought)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        finally:
            stream.close()
        for text, is_thought in tags.flush():
            yield chunk(text, is_thought)
        if finish is None:
            raise StreamDropped(f"{self.url} ended the stream before the reply finished; the "
                                "partial reply is kept")
        end = time.perf_counter()
        stats.stop_reason = {"length": "length", "cancelled": "cancelled"}.get(finish, "stop")
        stats.ttft_s = (first if first is not None else end) - start
        stats.prefill_s = stats.ttft_s
        stats.decode_s = (last - first) if first is not None else 0.0
        stats.generated_tokens = pieces
        stats.thought_tokens = thought_pieces
        stats.thinking_s = (thought_end - first) if thought_end is not None else 0.0
        if usage is not None:
            stats.prompt_tokens = usage.prompt_tokens or 0
            details = getattr(usage, "prompt_tokens_details", None)
            cached = getattr(details, "cached_tokens", None) or 0
            stats.prompt_eval_tokens = stats.prompt_tokens - cached
            stats.generated_tokens = usage.completion_tokens or pieces
            reasoning = getattr(getattr(usage, "completion_tokens_details", None),
                                "reasoning_tokens", None)
            if reasoning:
                stats.thought_tokens = reasoning
        yield Chunk("", stats=stats)

    def _events(self, stream) -> Iterator:
        """The stream's events, a dropped connection or a malformed event said in one line."""
        import httpx
        import openai

        iterator = iter(stream)
        while True:
            try:
                event = next(iterator)
            except StopIteration:
                return
            except (httpx.TransportError, httpx.StreamError, openai.APIConnectionError) as exc:
                cause = exc.__cause__ if isinstance(exc, openai.APIConnectionError) else exc
                raise StreamDropped(f"{self.url} dropped the connection mid-reply "
                                    f"({_reason(cause or exc)}); the partial reply is "
                                    "kept") from None
            except openai.APIError as exc:
                raise BackendError(f"{self.url} reported an error mid-reply: {_message(exc)}; "
                                   "the partial reply is kept") from None
            except ValueError as exc:
                raise BackendError(f"{self.url} sent a malformed stream ({exc}); the partial "
                                   "reply is kept") from None
            yield event

    # -- what only a local engine has --

    def _local_only(self, what: str) -> BackendError:
        return BackendError(f"{what} is not available for a model on a server ({self.url})")

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        raise self._local_only("counting tokens before sending")

    def detokenize(self, ids: Sequence[int], *, special: bool = False) -> str:
        raise self._local_only("decoding token ids")

    def stream(self, prompt, sampling, **options) -> Iterator[Chunk]:
        raise self._local_only("a prompt of token ids (a raw prompt)")

    @property
    def cached_tokens(self) -> list[int]:
        return []

    def trim_cache(self, n_tokens: int) -> str:
        return ""

    def save_state(self, path: Path) -> None:
        raise self._local_only("saving the KV cache")

    def load_state(self, path: Path) -> list[int]:
        raise self._local_only("loading a KV cache")

    def close(self) -> None:
        self.client.close()
