"""The chat page in a real headless Chromium (Debian's `chromium`, driven by playwright), against
`gemma ui` on the real 270M model: a reply streams in, stops mid-way, regenerates; conversations
switch, survive a reload, and are the REPL's (a chat started with `gemma chat` appears and goes
on); the token is needed; a reply with script in it renders inert. Screenshots (light and dark,
wide and narrow) go to test-artifacts/ui/ (or $GEMMA_TEST_ARTIFACTS/ui)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import GEMMA, run_gemma, stop_process_group

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium here (`apt-get install chromium`; .ci/run installs it)",
                allow_module_level=True)

ARTIFACTS = Path(os.environ.get("GEMMA_TEST_ARTIFACTS") or
                 Path(__file__).resolve().parent.parent / "test-artifacts") / "ui"
LONG = "Count from 1 to 500, one number per line."


class UIServer:
    """`gemma ui --no-browser` in a process of its own, with a GEMMA_HOME of its own."""

    def __init__(self, gguf: Path, home: Path, env: dict | None = None):
        self.home = home
        self.env = {**os.environ, "GEMMA_HOME": str(home), **(env or {})}
        self.process = subprocess.Popen([str(GEMMA), "ui", "-m", str(gguf), "--no-browser",
                                         "--ctx", "4096"], env=self.env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True)
        line = self.process.stdout.readline()
        match = re.search(r"chat page: (http://127\.0\.0\.1:(\d+)/ui/#token=(\S+))", line)
        assert match, (line, self.process.stderr.read() if self.process.poll() else "")
        self.url, port, self.token = match.group(1), match.group(2), match.group(3)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

    def api(self, path: str):
        return httpx.get(self.base + path, headers={"Authorization": f"Bearer {self.token}"},
                         timeout=30).json()

    def busy(self) -> int:
        return httpx.get(self.base + "/health", timeout=5).json()["busy"]

    def stop(self) -> None:
        stop_process_group(self.process)


@pytest.fixture(scope="module")
def ui(gguf_path, tmp_path_factory):
    server = UIServer(gguf_path, tmp_path_factory.mktemp("ui-home"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, ui):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.goto(ui.url)
    page.wait_for_selector("body[data-ready='1']", timeout=30000)
    yield page
    context.close()


def wait_until(page, expression: str, timeout: float = 60) -> None:
    """Poll a JavaScript expression until it is true (playwright's wait_for_function evaluates
    strings in the page, which the page's Content-Security-Policy forbids, rightly)."""
    deadline = time.time() + timeout
    while not page.evaluate(expression):
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.1)


def settings(page, **values) -> None:
    if page.locator("#settings").is_hidden():
        page.click("#toggle-settings")
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_reply(page) -> str:
    return page.locator(".msg.assistant .body").last.inner_text()


def wait_done(page, timeout: float = 120) -> None:
    page.wait_for_selector("#stop", state="hidden", timeout=timeout * 1000)
    wait_until(page, "!document.querySelector('#send').hidden")


def test_a_reply_streams_in(page, ui):
    settings(page, temperature=0, max_tokens=96)
    send(page, "Write a long story about a dragon.")
    page.wait_for_selector("#stop", state="visible")
    lengths = []
    deadline = time.time() + 120
    while page.locator("#stop").is_visible() and time.time() < deadline:
        lengths.append(len(last_reply(page)))
        time.sleep(0.1)
    wait_done(page)
    grew = sorted(set(n for n in lengths if n))
    assert len(grew) >= 3, lengths  # the text grew over time, not all at once
    assert last_reply(page).strip()
    assert re.search(r"\d+ tokens, [\d.]+ t/s", page.inner_text("#stats"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for theme in ("light", "dark"):
        if page.evaluate("document.documentElement.dataset.theme") != theme:
            page.click("#toggle-theme")
        for name, size in (("wide", (1280, 800)), ("narrow", (360, 740))):
            page.set_viewport_size({"width": size[0], "height": size[1]})
            page.wait_for_timeout(400)  # the list folds away with a short transition
            page.screenshot(path=str(ARTIFACTS / f"chat-{theme}-{name}.png"))
    # At 360 px the conversation list folds away behind its button.
    assert page.locator("#toggle-side").is_visible()
    page.click("#toggle-side")
    page.wait_for_timeout(300)
    assert page.locator("#list li").first.is_visible()


def test_stop_mid_reply_then_regenerate(page, ui):
    settings(page, temperature=0, max_tokens=1500)
    send(page, LONG)
    wait_until(page, "(document.querySelector('.msg.assistant:last-child .body') || "
                           "{innerText: ''}).innerText.length > 20")
    page.keyboard.press("Escape")  # Esc stops, like the Stop button
    wait_done(page, 30)
    assert page.locator(".msg.assistant").last.locator(".note").inner_text() == "(stopped)"
    deadline = time.time() + 5
    while ui.busy() and time.time() < deadline:
        time.sleep(0.1)
    assert ui.busy() == 0  # the server stopped generating
    current = page.evaluate("localStorage.getItem('gemma-chat-open')")
    stored = ui.api(f"/ui/api/conversations/{current}")
    assert len(stored["exchanges"]) == 1 and stored["exchanges"][0]["interrupted"]
    stopped = stored["exchanges"][0]["reply"]
    settings(page, max_tokens=12)
    page.locator(".msg.assistant").last.get_by_role("button", name="Regenerate").click()
    wait_done(page)
    stored = ui.api(f"/ui/api/conversations/{current}")
    assert len(stored["exchanges"]) == 1  # replaced, not added
    assert not stored["exchanges"][0]["interrupted"]
    assert stored["exchanges"][0]["reply"] != stopped and stored["exchanges"][0]["reply"]


def test_conversations_switch_and_survive_a_reload(page, ui):
    settings(page, temperature=0, max_tokens=8)
    page.click("#new-chat")
    send(page, "Alpha is the first letter")
    wait_done(page)
    page.click("#new-chat")
    send(page, "Omega is the last letter")
    wait_done(page)
    wait_until(page, "['Alpha is the first letter', 'Omega is the last letter'].every(t => "
                     "[...document.querySelectorAll('#list li .title')]"
                     ".some(e => e.innerText === t))", timeout=10)
    page.locator("#list li .title", has_text="Alpha is the first letter").click()
    wait_until(page, "document.querySelector('.msg.user .body').innerText"
                           ".startsWith('Alpha')")
    assert page.locator(".msg.user").count() == 1
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".msg.user .body").first.inner_text() == "Alpha is the first letter"
    assert page.locator("#list li").count() >= 2
    # Rename and search.
    page.fill("#search", "omega")
    wait_until(page, "document.querySelectorAll('#list li').length === 1")
    page.fill("#search", "")


def test_edit_rename_delete_and_the_system_prompt(page, ui):
    """Edit an earlier message (it and what follows are replaced), rename and delete a
    conversation from the list, and a system prompt that reaches the model (its turn)."""
    page.click("#new-chat")
    settings(page, temperature=0, max_tokens=6, system="Answer briefly.")
    for text in ("First message here", "Second message here"):
        send(page, text)
        wait_done(page)
    page.locator(".msg.user").first.get_by_role("button", name="Edit").click()
    assert page.input_value("#input") == "First message here"
    page.fill("#input", "An edited first message")
    page.press("#input", "Enter")
    wait_done(page)
    current = page.evaluate("localStorage.getItem('gemma-chat-open')")
    stored = ui.api(f"/ui/api/conversations/{current}")
    assert [e["user"] for e in stored["exchanges"]] == ["An edited first message"]
    assert stored["system"] == "Answer briefly."
    assert page.locator(".msg.user").count() == 1
    item = page.locator("#list li", has=page.locator(".title", has_text="An edited first"))
    page.once("dialog", lambda dialog: dialog.accept("Renamed chat"))
    item.get_by_role("button", name="Rename").click()
    page.wait_for_selector("#list li .title:text-is('Renamed chat')")
    assert ui.api(f"/ui/api/conversations/{current}")["title"] == "Renamed chat"
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#list li", has=page.locator(".title", has_text="Renamed chat")) \
        .get_by_role("button", name="Delete").click()
    wait_until(page, "![...document.querySelectorAll('#list li .title')]"
                     ".some(e => e.innerText === 'Renamed chat')")
    assert not (ui.home / "conversations" / f"{current}.jsonl").exists()
    assert page.locator(".msg").count() == 0  # the open conversation went with it


def test_a_terminal_chat_continues_in_the_page_and_back(page, ui, gguf_path):
    started = run_gemma("chat", "-m", str(gguf_path), "--temp", "0", "-n", "6",
                        input="Zebras live in Africa\n", env={"GEMMA_HOME": str(ui.home)})
    assert started.returncode == 0, started.stderr
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.locator("#list li .title", has_text="Zebras live in Africa").click()
    wait_until(page, "document.querySelectorAll('.msg.user').length === 1")
    settings(page, temperature=0, max_tokens=6)
    send(page, "And lions too")
    wait_done(page)
    files = [p for p in (ui.home / "conversations").glob("*.jsonl")
             if "Zebras live in Africa" in p.read_text()]
    assert len(files) == 1
    resumed = run_gemma("chat", "-m", str(gguf_path), "--resume", str(files[0]), "--temp", "0",
                        "-n", "6", input="/stats\n", env={"GEMMA_HOME": str(ui.home),
                                                         "COLUMNS": "300"})
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed 2 exchanges" in resumed.stderr
    text = files[0].read_text()
    assert "And lions too" in text


def test_a_refused_message_is_not_lost(page, ui):
    """A message longer than the context: the server's one-line error is shown, and the text
    goes back into the box; nothing half-made is stored."""
    page.click("#new-chat")
    long = "word " * 5000  # over the 4096-token context
    send(page, long)
    page.wait_for_selector("#error:not([hidden])")
    assert "context" in page.inner_text("#error")
    assert page.input_value("#input") == long
    assert page.locator(".msg").count() == 0


def test_the_token_is_needed(ui):
    assert httpx.get(ui.base + "/ui/api/conversations").status_code == 403
    assert httpx.get(ui.base + "/ui/api/conversations",
                     headers={"Authorization": "Bearer guess"}).status_code == 403
    assert httpx.post(ui.base + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}]}).status_code == 401
    rebound = httpx.get(ui.base + "/ui/api/info", headers={
        "Host": "attacker.example", "Authorization": f"Bearer {ui.token}"})
    assert rebound.status_code == 403


def test_a_reply_with_script_renders_inert(browser, ui):
    """A stored reply (as a model could write it) with a script tag, an onerror handler and a
    javascript: link: shown as text and harmless markup, nothing runs."""
    folder = ui.home / "conversations"
    folder.mkdir(parents=True, exist_ok=True)
    evil = ("Here you go: <script>window.__pwned = 1</script>\n\n"
            "<img src=x onerror=\"window.__pwned = 2\">\n\n"
            "[click me](javascript:window.__pwned=3) and `<b>code</b>`")
    path = folder / "20990101-000000-xss001.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in [
        {"type": "header", "format": "gemma-chat.conversation", "version": 1,
         "created": "2099-01-01T00:00:00+00:00", "model": {"name": "gemma-3-270m"},
         "system": None, "sampling": {}},
        {"type": "exchange", "user": "Show me some HTML", "reply": evil,
         "interrupted": False}]) + "\n")
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(ui.url)
    page.wait_for_selector("body[data-ready='1']")
    page.locator("#list li .title", has_text="Show me some HTML").click()
    page.wait_for_selector(".msg.assistant .body a")
    body = page.locator(".msg.assistant .body").first
    assert body.locator("script").count() == 0
    assert body.locator("img[onerror]").count() == 0
    href = body.locator("a").first.get_attribute("href")
    assert href is None or not href.lower().startswith("javascript")
    body.locator("a").first.click()
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    assert "<b>code</b>" in body.locator("code").first.inner_text()
    context.close()
    path.unlink()


def test_the_model_picker_downloads_and_switches(browser, gguf_path, tmp_path):
    """The picker lists the model on disk and the catalogue; choosing a catalogue model
    downloads it (from a stand-in Hub on 127.0.0.1, serving the 270M file under Gemma 2 2B's
    name), shows the progress, and the chat goes on with it."""
    from hubstub import HubStub

    with HubStub(tmp_path / "hub-files") as stub:
        stub.add("bartowski/gemma-2-2b-it-GGUF", "gemma-2-2b-it-Q4_K_M.gguf",
                 gguf_path.read_bytes())
        stub.delay = 0.001  # per 64 KB: a few seconds, so the progress shows
        server = UIServer(gguf_path, tmp_path / "home", env={
            "HF_ENDPOINT": stub.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
            "HF_HUB_OFFLINE": "", "HF_TOKEN": ""})
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        try:
            page = context.new_page()
            page.on("dialog", lambda dialog: dialog.accept())
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']")
            page.click("#model")
            page.wait_for_selector("#disk-models li.current")
            assert "gguf" in page.inner_text("#disk-models li.current")
            choice = page.locator("#catalogue-models li", has_text="gemma-2-2b-it").first
            assert "to download" in choice.inner_text()
            choice.get_by_role("button").click()
            seen = set()
            deadline = time.time() + 120
            while time.time() < deadline:
                text = page.inner_text("#switching-text") if page.locator(
                    "#switching").is_visible() else ""
                seen.add(text.split(":")[0])
                if page.locator("#switching").is_hidden() and len(seen) > 1:
                    break
                time.sleep(0.1)
            assert "downloading Gemma 2 2B IT" in seen, seen
            assert page.inner_text("#error") == ""
            models = server.api("/ui/api/models")
            current = [m for m in models["on_disk"] if m["current"]]
            assert len(current) == 1 and current[0]["path"].endswith(
                "gemma-2-2b-it-Q4_K_M.gguf")
            settings(page, temperature=0, max_tokens=6)
            send(page, "Hello again")
            wait_done(page)
            assert last_reply(page).strip()
        finally:
            context.close()
            server.stop()
