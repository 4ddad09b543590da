"""The chat page's server side, fast: the token and Host checks, the page's files, and the
conversation store the page shares with the REPL (same autosave files). Scripted backend; the
page itself in a real browser is in test_ui_browser."""

from __future__ import annotations

import pytest
from fakes import ScriptedBackend
from starlette.testclient import TestClient

from gemma_chat import sessions
from gemma_chat.server import create_app
from gemma_chat.server.ui import UISecurity, page_url

TOKEN = "page-token-123"
PORT = 8765
HOST = {"Host": f"127.0.0.1:{PORT}"}
AUTH = {**HOST, "Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def page(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_HOME", str(tmp_path / "home"))
    backend = ScriptedBackend().enqueue("Hello!")
    app = create_app(backend, ["gemma-3-1b-it"], page=UISecurity(TOKEN, PORT))
    with TestClient(app, base_url=f"http://127.0.0.1:{PORT}") as client:
        yield client


def test_every_api_needs_the_token(page):
    for path in ("/ui/api/info", "/ui/api/conversations"):
        assert page.get(path, headers=HOST).status_code == 403
        wrong = page.get(path, headers={**HOST, "Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and "token" in wrong.json()["error"]["message"]
        assert page.get(path, headers=AUTH).status_code == 200
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    assert page.post("/v1/chat/completions", json=body, headers=HOST).status_code == 401
    assert page.post("/api/chat", json={"model": "gemma-3-1b-it", "messages": [
        {"role": "user", "content": "hi"}]}, headers=HOST).status_code == 401
    ok = page.post("/v1/chat/completions", json=body, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello!"


def test_a_rebound_host_name_is_refused(page):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1."""
    evil = {"Host": f"evil.example:{PORT}", "Authorization": f"Bearer {TOKEN}"}
    for path in ("/ui/", "/ui/api/info", "/v1/models", "/health"):
        assert page.get(path, headers=evil).status_code == 403, path
    for host in (f"localhost:{PORT}", f"[::1]:{PORT}"):
        assert page.get("/ui/api/info", headers={**AUTH, "Host": host}).status_code == 200


def test_the_page_and_its_files(page):
    html = page.get("/ui/", headers=HOST)
    assert html.status_code == 200 and "<title>gemma-chat</title>" in html.text
    csp = html.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    for name in ("app.js", "app.css", "vendor/marked.umd.js", "vendor/purify.min.js",
                 "vendor/highlight.min.js"):
        assert page.get(f"/ui/static/{name}", headers=HOST).status_code == 200, name
    for name in ("../server/ui.py", "index.html", "vendor/LICENSES.md", "%2e%2e/__init__.py"):
        assert page.get(f"/ui/static/{name}", headers=HOST).status_code == 404, name
    assert page_url("127.0.0.1", PORT, TOKEN) == f"http://127.0.0.1:{PORT}/ui/#token={TOKEN}"


def test_info(page):
    info = page.get("/ui/api/info", headers=AUTH).json()
    assert info["model"] == "gemma-3-1b-it" and info["context"] == 4096
    assert info["can_think"] is False and info["media"] == []
    assert info["sampling"]["temperature"] == 1.0


def test_the_store_is_the_repls(page):
    new = page.post("/ui/api/conversations", json={"system": "Be brief.", "thinking": False},
                    headers=AUTH).json()
    cid = new["id"]
    path = sessions.autosave_path(cid)
    assert path.is_file() and path.parent == sessions.conversations_dir()
    for user, reply in (("First question", "First answer"), ("Second", "Two")):
        page.post(f"/ui/api/conversations/{cid}/exchanges", headers=AUTH,
                  json={"user": user, "reply": reply, "thoughts": "", "interrupted": False})
    page.post(f"/ui/api/conversations/{cid}/exchanges", headers=AUTH,
              json={"user": "Third", "reply": "Thr", "interrupted": True})
    one = page.get(f"/ui/api/conversations/{cid}", headers=AUTH).json()
    assert [e["user"] for e in one["exchanges"]] == ["First question", "Second", "Third"]
    assert one["exchanges"][2]["interrupted"] and one["system"] == "Be brief."
    assert one["title"] == "First question" and one["turns"] == 3
    # Regenerate: the last exchange undone, a new one stored; what the REPL reads is the same.
    page.post(f"/ui/api/conversations/{cid}/undo", json={"count": 1}, headers=AUTH)
    page.post(f"/ui/api/conversations/{cid}/exchanges", headers=AUTH,
              json={"user": "Third", "reply": "Three", "interrupted": False})
    saved = sessions.load(path)
    assert [(e.user, e.reply) for e in saved.exchanges] == [
        ("First question", "First answer"), ("Second", "Two"), ("Third", "Three")]
    assert saved.system == "Be brief."
    renamed = page.patch(f"/ui/api/conversations/{cid}", json={"title": "Numbers"},
                         headers=AUTH).json()
    assert renamed["title"] == "Numbers" and sessions.load(path).title == "Numbers"
    listing = page.get("/ui/api/conversations", headers=AUTH).json()["conversations"]
    assert [c["title"] for c in listing] == ["Numbers"]
    found = page.get("/ui/api/conversations?q=three", headers=AUTH).json()["conversations"]
    assert [c["id"] for c in found] == [cid]  # search looks into the messages too
    assert page.get("/ui/api/conversations?q=zebra", headers=AUTH).json()["conversations"] == []
    bad = page.post(f"/ui/api/conversations/{cid}/undo", json={"count": 9}, headers=AUTH)
    assert bad.status_code == 400
    assert page.delete(f"/ui/api/conversations/{cid}", headers=AUTH).status_code == 200
    assert not path.exists()
    assert page.get(f"/ui/api/conversations/{cid}", headers=AUTH).status_code == 404
    for bad_id in ("a.b", "x%00y", "%2e%2e"):
        assert page.get(f"/ui/api/conversations/{bad_id}", headers=AUTH).status_code == 400


class FakeSwitcher:
    """Finds and loads scripted models; ``broken`` names fail to load."""

    def __init__(self, current):
        self.current = current
        self.loaded: list[str] = []

    def find(self, name, progress):
        from gemma_chat.errors import ModelNotFound

        if name == "unknown":
            raise ModelNotFound("unknown model 'unknown'")
        task = progress.add_task(f"{name}.gguf", total=100)
        progress.advance(task, 100)
        progress.stop()
        return type("Resolved", (), {"name": name, "path": None})()

    def load(self, resolved):
        if resolved.name == "broken":
            raise RuntimeError("the file is corrupt")
        self.loaded.append(resolved.name)
        return ScriptedBackend().enqueue(f"I am {resolved.name}."), [resolved.name], None


def events_of(response) -> list[dict]:
    import json

    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ")]


def test_the_page_switches_models(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_HOME", str(tmp_path / "home"))
    switcher = FakeSwitcher(type("Resolved", (), {"name": "first", "path": None})())
    app = create_app(ScriptedBackend(), ["first"], page=UISecurity(TOKEN, PORT),
                     switcher=switcher)
    with TestClient(app, base_url=f"http://127.0.0.1:{PORT}") as client:
        models = client.get("/ui/api/models", headers=AUTH).json()
        assert models["switch"] and models["current"] == "first"
        assert all(m["download"] > 0 for m in models["catalogue"])  # sizes for the picker
        names = [m["name"] for m in models["catalogue"]]
        assert names.index("gemma-3-1b-it") < names.index("gemma-3-1b")  # IT models first
        events = events_of(client.post("/ui/api/model", json={"model": "second"},
                                       headers=AUTH))
        assert events[0] == {"stage": "download", "file": "second.gguf", "done": 0,
                             "total": 100}
        assert events[-2:] == [{"stage": "load", "model": "second"},
                               {"stage": "ready", "model": "second"}]
        assert client.get("/ui/api/info", headers=AUTH).json()["model"] == "second"
        reply = client.post("/v1/chat/completions", headers=AUTH, json={
            "messages": [{"role": "user", "content": "who?"}], "max_tokens": 16}).json()
        assert reply["choices"][0]["message"]["content"] == "I am second."
        # A model that fails to load: the error is said, and the one before is loaded again.
        events = events_of(client.post("/ui/api/model", json={"model": "broken"},
                                       headers=AUTH))
        assert events[-1] == {"error": "RuntimeError: the file is corrupt"}
        assert switcher.loaded == ["second", "second"]
        assert client.get("/ui/api/info", headers=AUTH).json()["model"] == "second"
        events = events_of(client.post("/ui/api/model", json={"model": "unknown"},
                                       headers=AUTH))
        assert events == [{"error": "unknown model 'unknown'"}]


def test_a_server_without_a_switcher_keeps_its_model(page):
    models = page.get("/ui/api/models", headers=AUTH).json()
    assert models["switch"] is False
    refused = page.post("/ui/api/model", json={"model": "x"}, headers=AUTH)
    assert refused.status_code == 400 and "serves one model" in refused.json()["error"]["message"]
