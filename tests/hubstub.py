"""A local stand-in for the Hugging Face Hub, for tests: real HTTP on 127.0.0.1.

It answers what huggingface_hub calls for downloads: ``HEAD``/``GET
/{repo}/resolve/{revision}/{file}`` (commit, ETag and size headers, ``Range`` requests),
``GET /api/models/{repo}/revision/{revision}`` and ``.../tree/{revision}`` (the file list,
for snapshot downloads) and
``GET /api/whoami-v2``. Files are served as plain HTTP (no Xet). Switches: ``gated`` repos
answer 401 with the Hub's error headers, ``drop_after`` closes the connection part-way through
the first GET of a file, ``delay`` slows every chunk.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "c0ffee0000000000000000000000000000000001"


class HubStub:
    def __init__(self, root: Path):
        self.root = root
        self.gated: set[str] = set()
        self.token: str | None = None  # when set, gated repos open to this token
        self.drop_after: int | None = None  # bytes sent before the first GET is cut
        self.delay = 0.0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self._dropped: set[str] = set()
        self._sha: dict[Path, str] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                stub.handle(self, head=True)

            def do_GET(self):
                stub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo: str, name: str, data: bytes | Path) -> Path:
        target = self.root / repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            target.symlink_to(data)
        else:
            target.write_bytes(data)
        return target

    def sha256(self, path: Path) -> str:
        if path not in self._sha:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            self._sha[path] = digest.hexdigest()
        return self._sha[path]

    # -- request handling ---------------------------------------------------------------------

    def _json(self, h, status: int, body: object, head: bool = False, headers=()):
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(data)

    def _authorized(self, h, repo: str) -> bool:
        if repo not in self.gated:
            return True
        auth = h.headers.get("Authorization", "")
        return self.token is not None and auth == f"Bearer {self.token}"

    def handle(self, h, head: bool):
        path = unquote(urlparse(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        if path == "/api/whoami-v2":
            if self.token and h.headers.get("Authorization") == f"Bearer {self.token}":
                return self._json(h, 200, {"type": "user", "name": "tester", "auth": {
                    "accessToken": {"displayName": "test", "role": "read"}}}, head)
            return self._json(h, 401, {"error": "Invalid credentials"}, head)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and "tree" in parts:
            i = parts.index("tree")
            repo = "/".join(parts[2:i])
            if not self._authorized(h, repo):
                return self._gated(h, repo, head)
            folder = self.root / repo
            entries = [{"type": "file", "path": str(p.relative_to(folder)),
                        "size": p.stat().st_size, "oid": self.sha256(p)[:40]}
                       for p in sorted(folder.rglob("*")) if p.is_file()]
            return self._json(h, 200, entries, head)
        if parts[:2] == ["api", "models"] and "revision" in parts:
            i = parts.index("revision")
            repo = "/".join(parts[2:i])
            if not self._authorized(h, repo):
                return self._gated(h, repo, head)
            folder = self.root / repo
            if not folder.is_dir():
                return self._json(h, 404, {"error": "Repository not found"}, head,
                                  [("X-Error-Code", "RepoNotFound")])
            siblings = [{"rfilename": str(p.relative_to(folder))}
                        for p in sorted(folder.rglob("*")) if p.is_file()]
            return self._json(h, 200, {"id": repo, "modelId": repo, "sha": COMMIT,
                                       "siblings": siblings, "private": False,
                                       "gated": repo in self.gated}, head)
        if "resolve" in parts:
            i = parts.index("resolve")
            repo, name = "/".join(parts[:i]), "/".join(parts[i + 2:])
            if not self._authorized(h, repo):
                return self._gated(h, repo, head)
            file = self.root / repo / name
            if not (self.root / repo).is_dir():
                return self._json(h, 404, {"error": "Repository not found"}, head,
                                  [("X-Error-Code", "RepoNotFound")])
            if not file.is_file():
                return self._json(h, 404, {"error": "Entry not found"}, head,
                                  [("X-Error-Code", "EntryNotFound")])
            return self._file(h, repo, file, head)
        return self._json(h, 404, {"error": "not found"}, head)

    def _gated(self, h, repo, head):
        return self._json(h, 401, {"error": "gated"}, head, [
            ("X-Error-Code", "GatedRepo"),
            ("X-Error-Message", f"Access to model {repo} is restricted. You must have access "
                                "to it and be authenticated to access it. Please log in.")])

    def _file(self, h, repo: str, file: Path, head: bool):
        size = file.stat().st_size
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0] or 0)
        h.send_response(206 if start else 200)
        etag = f'"{self.sha256(file)}"'
        h.send_header("ETag", etag)
        h.send_header("X-Linked-Etag", etag)
        h.send_header("X-Linked-Size", str(size))
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(size - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        h.end_headers()
        if head:
            return
        key = f"{repo}/{file.name}"
        cut = None
        if self.drop_after is not None and key not in self._dropped and start == 0:
            self._dropped.add(key)
            cut = self.drop_after
        sent = 0
        with open(file, "rb") as fh:
            fh.seek(start)
            for block in iter(lambda: fh.read(1 << 16), b""):
                if cut is not None and sent + len(block) > cut:
                    h.wfile.write(block[: cut - sent])
                    h.wfile.flush()
                    h.close_connection = True
                    h.connection.shutdown(2)  # the connection drops mid-body
                    return
                h.wfile.write(block)
                sent += len(block)
                if self.delay:
                    time.sleep(self.delay)
