"""Saved and autosaved conversations.

``/save FILE`` writes the conversation as JSON (messages, model, sampling settings, times) and,
beside it, the backend's KV cache state (``FILE.kv``), tagged with the model file's identity, so
``gemma chat --resume FILE`` continues without re-processing the history when the same model is
loaded. Every finished turn is also appended to an autosave file (JSON lines, one event per line,
flushed and synced), so a killed process loses at most the reply in progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import store
from .chat import Conversation, Exchange
from .errors import GemmaChatError, InvalidArgument

FORMAT = "gemma-chat.conversation"
VERSION = 1
MAX_FILE_BYTES = 64 * 2**20  # a conversation file larger than this is not one of ours


def model_identity(path: Path) -> str:
    """A cheap fingerprint of a model file or folder: sizes plus the bytes at the start and
    end (a GGUF's header holds its metadata). Enough to tell models apart, not a checksum."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read())
    return digest.hexdigest()[:32]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Saved:
    """A conversation read back from disk."""

    system: str | None
    exchanges: list[Exchange]
    model: dict[str, object] = field(default_factory=dict)
    sampling: dict[str, object] = field(default_factory=dict)
    created: str | None = None
    kv_path: Path | None = None
    path: Path | None = None
    kv_tokens: int | None = None  # tokens in the KV state, as recorded when it was saved
    thinking: bool = False  # the conversation had thinking on
    title: str | None = None  # a name given to it (the chat page renames conversations)

    @property
    def shown_title(self) -> str:
        """Its name, else the start of its first message."""
        if self.title:
            return self.title
        first = self.exchanges[0].user.strip() if self.exchanges else ""
        first = " ".join(first.split())
        return (first[:60] + "...") if len(first) > 60 else (first or "(empty)")


def conversations_dir() -> Path:
    return store.gemma_home() / "conversations"


def _model_record(convo: Conversation) -> dict[str, object]:
    info = convo.backend.info
    if convo.remote:
        return {"name": info.name, "url": convo.backend.url, "backend": info.backend,
                "identity": convo.backend.identity}
    return {"name": info.name, "path": str(info.path), "backend": info.backend,
            "identity": model_identity(info.path) if Path(info.path).exists() else ""}


def _identity(convo: Conversation) -> str:
    return convo.backend.identity if convo.remote else model_identity(convo.backend.info.path)


def save(convo: Conversation, path: Path, sampling: dict[str, object],
         created: str | None = None) -> Path | None:
    """Write the conversation to ``path`` (JSON) and its KV state to ``path.kv``, atomically.

    Returns the KV state's path, or None when the backend could not save it.
    """
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise InvalidArgument(f"cannot save to {path}: the folder {path.parent} does not exist")
    kv_path = path.with_name(path.name + ".kv")
    record = {
        "format": FORMAT, "version": VERSION, "created": created or now(), "saved": now(),
        "model": _model_record(convo), "system": convo.system, "sampling": sampling,
        "thinking": convo.thinking, "messages": convo.messages,
        "exchanges": [{**ex.to_dict(), "reply_ids": ex.reply_ids} for ex in convo.exchanges],
        "kv_state": None,
    }
    try:
        saved_kv = None
        if convo.exchanges:
            try:
                with store.atomic_path(kv_path) as tmp:
                    convo.backend.save_state(tmp)
                record["kv_state"] = kv_path.name
                record["kv_tokens"] = len(convo.backend.cached_tokens)
                record["kv_bytes"] = kv_path.stat().st_size
                saved_kv = kv_path
            except GemmaChatError:
                saved_kv = None
        with store.atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=_plain),
                           encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot save to {path}: {exc.strerror or exc}") from None
    return saved_kv


def _plain(value: object) -> object:
    """JSON for what a conversation holds besides plain data: a picture or clip is kept as
    where it came from and its hash (:meth:`gemma_chat.media.Media.to_dict`)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} cannot be saved")


def _exchanges_from(records: object, where: Path) -> list[Exchange]:
    if not isinstance(records, list):
        raise InvalidArgument(f"{where} is not a gemma-chat conversation (its exchanges are not "
                              "a list)")
    out = []
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("user"), str) \
                or not isinstance(rec.get("reply", ""), str):
            raise InvalidArgument(f"{where} is not a gemma-chat conversation (bad exchange)")
        ids = rec.get("reply_ids") or []
        if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                              for i in ids)):
            ids = []
        thoughts = rec.get("thoughts", "")
        calls = rec.get("calls") or []
        if not (isinstance(calls, list) and all(isinstance(c, dict) and
                                                c.get("role") in ("assistant", "tool")
                                                for c in calls)):
            raise InvalidArgument(f"{where} is not a gemma-chat conversation (bad tool calls)")
        exchange = Exchange(rec["user"], rec.get("reply", ""), list(ids),
                            bool(rec.get("interrupted", False)),
                            thoughts if isinstance(thoughts, str) else "", calls)
        exchange.media, exchange.missing_media = _media_of(rec.get("media"), where)
        out.append(exchange)
    return out


def _media_of(records: object, where: Path) -> tuple[list, list[str]]:
    """The pictures and clips an exchange was sent with, read again from where they came
    from and checked against their hash; (media, one line for each that could not be)."""
    from .media import MediaError
    from .media import load as load_media

    if not records:
        return [], []
    if not (isinstance(records, list) and all(
            isinstance(r, dict) and r.get("type") in ("image", "audio") and
            isinstance(r.get("source"), str) and isinstance(r.get("sha256"), str)
            for r in records)):
        raise InvalidArgument(f"{where} is not a gemma-chat conversation (bad media)")
    media, missing = [], []
    for r in records:
        try:
            media.append(load_media(r["source"], kind=r["type"], allow_remote=True,
                                    expect_sha256=r["sha256"]))
        except MediaError as exc:
            missing.append(str(exc))
    return media, missing


def _exchanges_from_messages(messages: object, where: Path) \
        -> tuple[str | None, list[Exchange]]:
    from . import template
    from .errors import InvalidMessages

    if not isinstance(messages, list):
        raise InvalidArgument(f"{where} is not a gemma-chat conversation (its messages are not "
                              "a list)")
    try:
        system, turns = template.normalize(messages)
    except InvalidMessages as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    exchanges = []
    for i in range(0, len(turns) - 1, 2):
        user, reply = (t[1] if isinstance(t[1], str) else
                       "".join(p for p in t[1] if type(p) is str) for t in turns[i:i + 2])
        exchanges.append(Exchange(user, reply))
    return system, exchanges


def load(path: Path) -> Saved:
    """Read a conversation saved with ``/save`` or an autosave file; clear errors otherwise."""
    path = Path(path).expanduser()
    text = _read_bounded(path)
    if path.suffix == ".jsonl":
        return _load_autosave(path, text)
    record = _json(text, path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InvalidArgument(f"{path} is not a gemma-chat conversation")
    if "exchanges" in record:
        exchanges = _exchanges_from(record["exchanges"], path)
        system = record.get("system")
    else:
        system, exchanges = _exchanges_from_messages(record.get("messages", []), path)
    return Saved(system if isinstance(system, str) else None, exchanges,
                 _mapping(record.get("model")), _mapping(record.get("sampling")),
                 record.get("created") if isinstance(record.get("created"), str) else None,
                 _kv_state(record, path), path,
                 record["kv_tokens"] if isinstance(record.get("kv_tokens"), int) else None,
                 thinking=record.get("thinking") is True)


def _read_bounded(path: Path) -> str:
    """The file's text, refused when it is not a regular file or too large to be ours."""
    try:
        if not path.exists():
            raise InvalidArgument(f"{path} does not exist")
        if not path.is_file():
            raise InvalidArgument(f"{path} is not a regular file")
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise InvalidArgument(f"{path} is over {MAX_FILE_BYTES // 2**20} MB: not a gemma-chat "
                              "conversation")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"cannot read {path}: not UTF-8 text ({exc.reason})") from None


def _json(text: str, where: Path, line: int | None = None):
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidArgument(f"{where} nests too deeply to be a gemma-chat conversation") \
            from None
    except ValueError as exc:
        at = f"line {line}" if line else f"line {getattr(exc, 'lineno', '?')}"
        raise InvalidArgument(f"{where} is not valid JSON ({at})") from None


def _mapping(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _kv_state(record: dict, where: Path) -> Path | None:
    """The KV state file beside a conversation: a plain file name, present, and of the size
    recorded when it was written (a truncated state aborts llama.cpp as it reads it)."""
    name = record.get("kv_state")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
            or "\\" in name or "\0" in name:
        return None
    kv = where.parent / name
    try:
        if not kv.is_file():
            return None
        size = kv.stat().st_size
    except OSError:
        return None
    expected = record.get("kv_bytes")
    if not isinstance(expected, int) or isinstance(expected, bool) or size != expected:
        return None  # written by an older version, cut short, or replaced: re-process instead
    return kv


class Autosave:
    """Appends every finished turn to a JSON-lines file in the conversations folder.

    A write that fails (a full disk, a folder gone read-only) never ends the chat: the events
    wait in memory, ``problem`` says what happened, and the next write tries them all again.
    What was written before is never damaged: a partial line is cut off again.
    """

    def __init__(self, folder: Path | None = None):
        self.folder = folder or conversations_dir()
        self.path: Path | None = None
        self.pending: list[dict[str, object]] = []
        self.problem: str | None = None

    def start(self, convo: Conversation, sampling: dict[str, object]) -> None:
        """Begin a new file (on the first turn of a conversation)."""
        self.pending.clear()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = self.folder / f"{stamp}-{uuid.uuid4().hex[:6]}.jsonl"
        self._write({"type": "header", "format": FORMAT, "version": VERSION, "created": now(),
                     "model": _model_record(convo), "system": convo.system,
                     "sampling": sampling, "thinking": convo.thinking})
        for ex in convo.exchanges:  # a resumed or loaded conversation starts with its history
            self._write({"type": "exchange", **ex.to_dict(), "reply_ids": ex.reply_ids})

    def _write(self, event: dict[str, object]) -> None:
        assert self.path is not None
        self.pending.append(event)
        size = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            size = self.path.stat().st_size if self.path.exists() else 0
            with open(self.path, "a", encoding="utf-8") as fh:
                for item in self.pending:
                    fh.write(json.dumps(item, ensure_ascii=False, default=_plain) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if size is not None:
                try:
                    os.truncate(self.path, size)  # no half-written line after good ones
                except OSError:
                    pass
            self.problem = (f"the conversation could not be autosaved to {self.path} "
                            f"({exc.strerror or exc}); the chat goes on, and the turns are "
                            "written as soon as there is room")
            return
        self.pending.clear()
        self.problem = None

    def record(self, convo: Conversation, sampling: dict[str, object], event: dict) -> None:
        if self.path is None:
            if convo.exchanges:
                self.start(convo, sampling)  # writes the current state, this event included
            return
        self._write(event)

    def exchange(self, convo: Conversation, sampling: dict[str, object]) -> None:
        ex = convo.exchanges[-1]
        self.record(convo, sampling, {"type": "exchange", **ex.to_dict(),
                                      "reply_ids": ex.reply_ids})

    def reset(self) -> None:
        """The conversation was cleared: the next turn starts a new file."""
        self.path = None

    def resume(self, path: Path) -> None:
        """Go on appending to an autosave file (a resumed conversation stays one file, so the
        chat page and ``--resume`` list it once)."""
        self.pending.clear()
        self.path = Path(path)


def _load_autosave(path: Path, text: str) -> Saved:
    header: dict = {}
    title = None
    system = None
    thinking = False
    exchanges: list[Exchange] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = _json(line, path, n)
        except InvalidArgument:
            if n == len(text.splitlines()):
                break  # a line cut short by a crash: everything before it stands
            raise
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "header":
            header, system = event, event.get("system")
            thinking = event.get("thinking") is True
            system = system if isinstance(system, str) else None
        elif kind == "exchange":
            exchanges += _exchanges_from([event], path)
        elif kind == "system":
            system = event.get("system") if isinstance(event.get("system"), str) else None
        elif kind == "thinking":
            thinking = event.get("thinking") is True
        elif kind == "undo" and exchanges:
            exchanges.pop()
        elif kind == "title":
            title = event.get("title") if isinstance(event.get("title"), str) else None
    if header.get("format") != FORMAT:
        raise InvalidArgument(f"{path} is not a gemma-chat conversation")
    created = header.get("created")
    return Saved(system, exchanges, _mapping(header.get("model")), _mapping(header.get("sampling")),
                 created if isinstance(created, str) else None, None, path,
                 thinking=thinking, title=title)


def autosave_path(conversation_id: str) -> Path:
    """The autosave file of a conversation id (its file name without ``.jsonl``), refused
    when the id could name anything outside the conversations folder."""
    if not conversation_id or not all(c.isalnum() or c in "-_" for c in conversation_id):
        raise InvalidArgument(f"invalid conversation id {conversation_id!r}")
    return conversations_dir() / f"{conversation_id}.jsonl"


def append_event(path: Path, event: dict[str, object]) -> None:
    """One event at the end of an autosave file (flushed and synced, as :class:`Autosave`
    writes them)."""
    if not path.is_file():
        raise InvalidArgument(f"no conversation {path.stem}")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event, ensure_ascii=False, default=_plain) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def recent(limit: int = 20) -> list[Path]:
    """Autosaved conversations, newest first."""
    folder = conversations_dir()
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    return files[:limit]


def load_latest() -> Saved:
    """The newest autosaved conversation; when it cannot be read, the error says which older
    ones can."""
    files = recent()
    if not files:
        raise InvalidArgument("there is no conversation to resume yet")
    try:
        return load(files[0])
    except GemmaChatError as exc:
        fine = []
        for path in files[1:]:
            try:
                load(path)
                fine.append(path)
            except GemmaChatError:
                continue
            if len(fine) == 3:
                break
        others = (f"; these older ones can be resumed: {', '.join(str(p) for p in fine)}"
                  if fine else "; no older conversation can be resumed either")
        raise InvalidArgument(f"the latest conversation cannot be resumed: {exc}{others}") \
            from None


def restore(convo: Conversation, saved: Saved) -> str:
    """Put a saved conversation into ``convo``; re-use its KV state when the same model is
    loaded. Returns a one-line note of what happened."""
    same_model = saved.model.get("identity") == _identity(convo)
    n_vocab = convo.backend.info.n_vocab
    if same_model and not convo.remote and any(
            not 0 <= t < n_vocab for ex in saved.exchanges for t in ex.reply_ids):
        where = saved.path or "the conversation"
        raise InvalidArgument(f"{where} holds token ids outside this model's vocabulary")
    convo.set_system(saved.system)
    if saved.thinking and convo.prompts.can_think:
        convo.thinking = True
    convo.exchanges = saved.exchanges
    if not same_model:
        convo.rebind(convo.backend)  # reply ids belong to another vocabulary: re-tokenize
    for ex in convo.exchanges:
        if not ex.reply_ids and not convo.remote:
            ex.reply_ids = convo.backend.tokenize(ex.reply, special=False)
    n = len(convo.exchanges)
    missing = [m for ex in convo.exchanges for m in ex.missing_media]
    if missing:
        others = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return (f"resumed {n} exchanges without {len(missing)} of their attachments: "
                f"{missing[0]}{others}")
    if convo.remote:
        return (f"resumed {n} exchanges; the server is sent the whole conversation on the next "
                "turn")
    if saved.kv_path is not None and same_model and (
            saved.kv_tokens is None or saved.kv_tokens > convo.backend.info.n_ctx):
        return (f"resumed {n} exchanges; the KV state holds {saved.kv_tokens} tokens and the "
                f"context {convo.backend.info.n_ctx}, so the history is re-processed")
    if saved.kv_path is not None and same_model:
        try:
            cached = convo.backend.load_state(saved.kv_path)
        except GemmaChatError:
            return (f"resumed {n} exchanges; the KV state did not load, so the history is "
                    "re-processed")
        return (f"resumed {n} exchanges with their KV state ({len(cached)} tokens, "
                "no re-processing)")
    if saved.kv_path is not None:
        return f"resumed {n} exchanges; saved with another model, so the history is re-processed"
    return f"resumed {n} exchanges; the history is re-processed on the next turn"
