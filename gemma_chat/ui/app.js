// gemma-chat's chat page. It talks to the server's own OpenAI API (/v1/chat/completions,
// streamed) and keeps conversations through /ui/api, in the REPL's autosave files.
// Model text is rendered as Markdown and sanitized with DOMPurify before it reaches the page.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "gemma-chat-token";
  const SETTINGS = ["temperature", "top_k", "top_p", "min_p", "max_tokens", "seed"];

  // -- the token: from the opened URL's fragment, kept for this tab only --------------------
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem(TOKEN_KEY, fromHash);
    history.replaceState(null, "", location.pathname + location.search);
  }
  const token = sessionStorage.getItem(TOKEN_KEY) || "";

  const state = {
    info: null,
    current: null, // {id, system, thinking, exchanges: [{user, reply, thoughts, interrupted}]}
    controller: null, // the AbortController of the reply being streamed
    attached: [], // {kind, name, part}
    editing: null, // the index of the exchange being edited, or null
  };

  async function api(path, options = {}) {
    const headers = Object.assign({ Authorization: `Bearer ${token}` }, options.headers || {});
    if (options.body && typeof options.body !== "string") {
      headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(options.body);
    }
    const response = await fetch(path, Object.assign({}, options, { headers }));
    if (!response.ok && !options.raw) {
      let message = `${response.status}`;
      try { message = (await response.json()).error.message; } catch (_) { /* keep status */ }
      throw new Error(message);
    }
    return options.raw ? response : response.json();
  }

  // The data of each server-sent event of a streamed response, parsed (a generator).
  async function* serverEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ") && line !== "data: [DONE]") yield JSON.parse(line.slice(6));
        }
      }
    }
  }

  function showError(text) {
    const box = $("error");
    box.textContent = text || "";
    box.hidden = !text;
  }

  // -- rendering ------------------------------------------------------------------------------
  function markdown(element, text) {
    const html = window.marked.parse(text, { gfm: true, breaks: false });
    element.innerHTML = window.DOMPurify.sanitize(html, { USE_PROFILES: { html: true } });
    element.querySelectorAll("pre > code").forEach((code) => {
      try { window.hljs.highlightElement(code); } catch (_) { /* plain text is fine */ }
      const button = document.createElement("button");
      button.className = "copy";
      button.type = "button";
      button.textContent = "Copy";
      button.addEventListener("click", () => {
        navigator.clipboard.writeText(code.innerText).then(() => {
          button.textContent = "Copied";
          setTimeout(() => { button.textContent = "Copy"; }, 1200);
        });
      });
      code.parentElement.appendChild(button);
    });
  }

  function messageElement(role) {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    const body = document.createElement("div");
    body.className = "body";
    div.appendChild(body);
    $("messages").appendChild(div);
    return div;
  }

  function addTools(div, index, role) {
    const tools = document.createElement("div");
    tools.className = "tools";
    const add = (label, action) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.addEventListener("click", action);
      tools.appendChild(b);
    };
    if (role === "user") {
      add("Edit", () => startEdit(index));
    } else {
      add("Copy", () => navigator.clipboard.writeText(state.current.exchanges[index].reply));
      if (index === state.current.exchanges.length - 1) add("Regenerate", regenerate);
    }
    div.appendChild(tools);
  }

  function thoughtsElement(div, text, seconds) {
    let details = div.querySelector("details.thoughts");
    if (!details) {
      details = document.createElement("details");
      details.className = "thoughts";
      details.innerHTML = "<summary></summary><div></div>";
      div.insertBefore(details, div.firstChild);
    }
    details.querySelector("summary").textContent =
      seconds === null ? "Thinking..." : `Thought for ${seconds.toFixed(1)} s`;
    details.querySelector("div").textContent = text;
    return details;
  }

  function renderConversation() {
    const box = $("messages");
    box.textContent = "";
    const convo = state.current;
    if (!convo) return;
    convo.exchanges.forEach((ex, i) => {
      const user = messageElement("user");
      user.querySelector(".body").textContent = ex.user;
      addTools(user, i, "user");
      const reply = messageElement("assistant");
      if (ex.thoughts) thoughtsElement(reply, ex.thoughts, 0).querySelector("summary")
        .textContent = "Thoughts";
      markdown(reply.querySelector(".body"), ex.reply);
      if (ex.interrupted) note(reply, "(stopped)");
      addTools(reply, i, "assistant");
    });
    box.scrollTop = box.scrollHeight;
  }

  function note(div, text) {
    const span = document.createElement("div");
    span.className = "note";
    span.textContent = text;
    div.appendChild(span);
  }

  // -- conversations --------------------------------------------------------------------------
  async function refreshList() {
    const q = $("search").value.trim();
    const data = await api(`/ui/api/conversations${q ? `?q=${encodeURIComponent(q)}` : ""}`);
    const list = $("list");
    list.textContent = "";
    for (const c of data.conversations) {
      const li = document.createElement("li");
      li.dataset.id = c.id;
      if (state.current && state.current.id === c.id) li.className = "current";
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = c.title;
      title.title = `${c.title} (${c.turns} turns, ${c.model || "?"})`;
      li.appendChild(title);
      const rename = document.createElement("button");
      rename.type = "button";
      rename.textContent = "Rename";
      rename.addEventListener("click", async (event) => {
        event.stopPropagation();
        const name = prompt("Rename the conversation", c.title);
        if (name && name.trim()) {
          await api(`/ui/api/conversations/${c.id}`, { method: "PATCH", body: { title: name.trim() } });
          refreshList();
        }
      });
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Delete";
      remove.addEventListener("click", async (event) => {
        event.stopPropagation();
        if (!confirm(`Delete "${c.title}"?`)) return;
        await api(`/ui/api/conversations/${c.id}`, { method: "DELETE" });
        if (state.current && state.current.id === c.id) newChat();
        refreshList();
      });
      li.append(rename, remove);
      li.addEventListener("click", () => openConversation(c.id));
      list.appendChild(li);
    }
  }

  async function openConversation(id) {
    if (state.controller) return; // a reply is streaming
    const data = await api(`/ui/api/conversations/${id}`);
    state.current = { id: data.id, system: data.system, thinking: data.thinking,
      exchanges: data.exchanges };
    $("system").value = data.system || "";
    $("thinking").checked = !!data.thinking;
    state.editing = null;
    renderConversation();
    document.body.classList.remove("side-open");
    for (const li of $("list").children) {
      li.classList.toggle("current", li.dataset.id === id);
    }
    localStorage.setItem("gemma-chat-open", id);
  }

  function newChat() {
    if (state.controller) return;
    state.current = null;
    state.editing = null;
    $("messages").textContent = "";
    $("system").value = "";
    for (const li of $("list").children) li.classList.remove("current");
    localStorage.removeItem("gemma-chat-open");
    $("input").focus();
  }

  // -- sending ---------------------------------------------------------------------------------
  function sampling() {
    const out = {};
    for (const name of SETTINGS) {
      const value = $(name).value.trim();
      if (value !== "") out[name] = Number(value);
    }
    if (out.max_tokens === undefined && state.info.max_tokens) out.max_tokens = state.info.max_tokens;
    return out;
  }

  function messagesFor(exchanges, text, parts) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const ex of exchanges) {
      messages.push({ role: "user", content: ex.user });
      messages.push({ role: "assistant", content: ex.reply });
    }
    messages.push({ role: "user", content: parts.length
      ? [...parts, { type: "text", text }] : text });
    return messages;
  }

  async function ensureConversation() {
    if (state.current) {
      const system = $("system").value.trim() || null;
      const thinking = $("thinking").checked;
      if (system !== (state.current.system || null) || thinking !== !!state.current.thinking) {
        await api(`/ui/api/conversations/${state.current.id}`,
          { method: "PATCH", body: { system, thinking } });
        state.current.system = system;
        state.current.thinking = thinking;
      }
      return;
    }
    const created = await api("/ui/api/conversations", { method: "POST",
      body: { system: $("system").value.trim() || null, thinking: $("thinking").checked } });
    state.current = { id: created.id, system: $("system").value.trim() || null,
      thinking: $("thinking").checked, exchanges: [] };
    localStorage.setItem("gemma-chat-open", created.id);
  }

  async function send(text) {
    if (state.controller || !text.trim()) return;
    // Busy from the first moment (before any request), so nothing else starts meanwhile.
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    showError("");
    if (state.editing !== null && state.current) {
      const convo = state.current;
      const drop = convo.exchanges.length - state.editing;
      try {
        await api(`/ui/api/conversations/${convo.id}/undo`,
          { method: "POST", body: { count: drop } });
      } catch (error) {
        showError(`error: ${error.message}`);
        state.controller = null;
        setBusy(false);
        return;
      }
      convo.exchanges.splice(state.editing);
      state.editing = null;
      renderConversation();
    }
    const parts = state.attached.map((a) => a.part);
    const names = state.attached.map((a) => a.name);
    state.attached = [];
    renderAttached();
    const user = messageElement("user");
    user.querySelector(".body").textContent = text;
    if (names.length) note(user, `with ${names.join(", ")}`);
    const reply = messageElement("assistant");
    const body = reply.querySelector(".body");
    let answer = "";
    let thoughts = "";
    let usage = null;
    let finished = false;
    let failed = false;
    let pieces = 0;
    let first = null;
    let thoughtEnd = null;
    const start = performance.now();
    let scheduled = false;
    const paint = () => {
      scheduled = false;
      markdown(body, answer);
      const box = $("messages");
      box.scrollTop = box.scrollHeight;
    };
    const request = {
      model: state.info.model, stream: true, stream_options: { include_usage: true },
      messages: messagesFor(state.current ? state.current.exchanges : [], text, parts),
      chat_template_kwargs: { enable_thinking: $("thinking").checked },
      ...sampling(),
    };
    try {
      const response = await api("/v1/chat/completions",
        { method: "POST", body: request, signal: controller.signal, raw: true });
      if (!response.ok) {
        let message = `${response.status}`;
        try { message = (await response.json()).error.message; } catch (_) { /* status */ }
        throw new Error(message);
      }
      for await (const chunk of serverEvents(response)) {
        if (chunk.error) throw new Error(chunk.error.message || "the server failed");
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          const thought = delta.reasoning_content || delta.reasoning;
          if (thought || delta.content) {
            pieces += 1;
            if (first === null) first = performance.now();
          }
          if (thought) {
            thoughts += thought;
            thoughtsElement(reply, thoughts, null);
          }
          if (delta.content) {
            if (thoughts && thoughtEnd === null) {
              thoughtEnd = performance.now();
              thoughtsElement(reply, thoughts, (thoughtEnd - first) / 1000);
            }
            answer += delta.content;
            if (!scheduled) { scheduled = true; requestAnimationFrame(paint); }
          }
          if (choice.finish_reason) finished = true;
        }
      }
    } catch (error) {
      if (error.name !== "AbortError") {
        failed = true;
        showError(`error: ${error.message}`);
      }
    }
    const end = performance.now();
    markdown(body, answer);
    if (thoughts) thoughtsElement(reply, thoughts, ((thoughtEnd || performance.now()) - first) / 1000);
    if (!finished) note(reply, "(stopped)");
    const exchange = { user: text, reply: answer, thoughts, interrupted: !finished };
    try {
      // Kept as the REPL keeps it: a reply stopped early is stored, marked; a refused one is not.
      if (!failed || answer || thoughts) {
        await ensureConversation(); // a new conversation's file starts with its first exchange
        const convo = state.current;
        convo.exchanges.push(exchange);
        await api(`/ui/api/conversations/${convo.id}/exchanges`,
          { method: "POST", body: exchange });
        renderConversation();
      } else {
        renderConversation(); // refused: the message goes back to the box, nothing is lost
        $("input").value = text;
      }
      showStats(usage, pieces, first, start, end);
      await refreshList();
    } catch (error) {
      showError(`error: ${error.message}`);
    } finally {
      state.controller = null; // ready for the next message once this one is stored
      setBusy(false);
    }
  }

  function showStats(usage, pieces, first, start, end) {
    const tokens = usage ? usage.completion_tokens : pieces;
    const decode = first !== null && tokens > 1 ? (tokens - 1) / ((end - first) / 1000) : 0;
    const ttft = first !== null ? first - start : 0;
    const used = usage ? usage.prompt_tokens + usage.completion_tokens : null;
    $("stats").textContent = `${tokens} tokens, ${decode.toFixed(1)} t/s, first after ` +
      `${Math.round(ttft)} ms` + (used !== null ? `, context ${used}/${state.info.context}` : "");
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function regenerate() {
    const convo = state.current;
    if (!convo || !convo.exchanges.length || state.controller) return;
    const last = convo.exchanges[convo.exchanges.length - 1];
    state.editing = convo.exchanges.length - 1; // the last exchange is replaced
    send(last.user).catch((error) => showError(`error: ${error.message}`));
  }

  function startEdit(index) {
    if (state.controller) return;
    state.editing = index;
    $("input").value = state.current.exchanges[index].user;
    $("input").focus();
    showError(`editing message ${index + 1}: sending replaces it and everything after it ` +
      "(Esc cancels)");
  }

  // -- the model picker ----------------------------------------------------------------------------
  function human(bytes) {
    if (bytes >= 1e9) return `${(bytes / 1e9).toFixed(1)} GB`;
    return `${Math.round(bytes / 1e6)} MB`;
  }

  async function showModels() {
    const panel = $("models");
    panel.hidden = !panel.hidden;
    if (panel.hidden) return;
    const data = await api("/ui/api/models");
    const row = (list, label, detail, action, current) => {
      const li = document.createElement("li");
      if (current) li.className = "current";
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.disabled = !data.switch || current;
      button.addEventListener("click", action);
      const span = document.createElement("span");
      span.className = "detail";
      span.textContent = detail;
      li.append(button, span);
      list.appendChild(li);
    };
    const disk = $("disk-models");
    disk.textContent = "";
    for (const m of data.on_disk) {
      row(disk, m.name, `${m.format}, ${m.quantization}, ${human(m.size)}`,
        () => switchModel(m.path, m.name), m.current);
    }
    const cat = $("catalogue-models");
    cat.textContent = "";
    for (const m of data.catalogue) {
      row(cat, m.name, `${m.display}, ${m.params}, about ${human(m.download)} to download`,
        () => {
          if (confirm(`Download ${m.display} (about ${human(m.download)}) and switch to it?`)) {
            switchModel(m.name, m.display);
          }
        }, false);
    }
    if (!data.switch) {
      showError("this server serves one model: `gemma ui` switches models");
    }
  }

  async function switchModel(target, label) {
    if (state.controller) return;
    showError("");
    $("switching").hidden = false;
    $("switching-text").textContent = `switching to ${label}...`;
    const bar = $("switching-bar");
    bar.removeAttribute("value");
    let failed = null;
    try {
      const response = await api("/ui/api/model", { method: "POST", body: { model: target },
        raw: true });
      if (!response.ok) throw new Error((await response.json()).error.message);
      for await (const event of serverEvents(response)) {
        if (event.error) failed = event.error;
        else if (event.stage === "download") {
          if (event.total) { bar.max = event.total; bar.value = event.done; }
          $("switching-text").textContent =
            `downloading ${label}: ${human(event.done)} of ${human(event.total || 0)}`;
        } else if (event.stage === "load") {
          bar.removeAttribute("value");
          $("switching-text").textContent = `loading ${label}...`;
        }
      }
    } catch (error) {
      failed = error.message;
    }
    $("switching").hidden = true;
    if (failed) showError(`error: ${failed}`);
    state.info = await api("/ui/api/info");
    applyInfo();
    $("models").hidden = true;
  }

  // -- attachments -------------------------------------------------------------------------------
  function renderAttached() {
    const box = $("attached");
    box.textContent = "";
    for (const a of state.attached) {
      const chip = document.createElement("span");
      chip.textContent = `${a.kind}: ${a.name}`;
      box.appendChild(chip);
    }
  }

  function attach(file) {
    const kind = file.type.startsWith("image/") ? "image"
      : file.type.startsWith("audio/") ? "audio" : null;
    if (!kind || !state.info.media.includes(kind)) {
      showError(`${state.info.model} does not take ${kind || file.type || "this file"}s`);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => {
      const url = reader.result;
      const part = kind === "image"
        ? { type: "image_url", image_url: { url } }
        : { type: "input_audio", input_audio: { data: url.split(",")[1],
          format: (file.name.split(".").pop() || "wav").toLowerCase() } };
      state.attached.push({ kind, name: file.name || kind, part });
      renderAttached();
    };
    reader.readAsDataURL(file);
  }

  // -- settings and theme ------------------------------------------------------------------------
  function applyTheme(theme) {
    document.documentElement.dataset.theme = theme;
    $("hl-light").disabled = theme === "dark";
    $("hl-dark").disabled = theme !== "dark";
  }

  function wire() {
    const saved = localStorage.getItem("gemma-chat-theme");
    applyTheme(saved || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light"));
    $("toggle-theme").addEventListener("click", () => {
      const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
      localStorage.setItem("gemma-chat-theme", next);
      applyTheme(next);
    });
    $("toggle-settings").addEventListener("click", () => {
      $("settings").hidden = !$("settings").hidden;
    });
    $("toggle-side").addEventListener("click", () => document.body.classList.toggle("side-open"));
    $("model").addEventListener("click", () => showModels().catch((e) => showError(e.message)));
    $("new-chat").addEventListener("click", newChat);
    $("search").addEventListener("input", () => refreshList());
    $("send").addEventListener("click", () => submit());
    $("stop").addEventListener("click", stop);
    const input = $("input");
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        submit();
      }
    });
    input.addEventListener("input", () => {
      input.style.height = "auto";
      input.style.height = `${input.scrollHeight}px`;
    });
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape") return;
      if (state.controller) stop();
      else if (state.editing !== null) { state.editing = null; showError(""); }
    });
    $("attach").addEventListener("click", () => $("file").click());
    $("file").addEventListener("change", () => {
      for (const file of $("file").files) attach(file);
      $("file").value = "";
    });
    input.addEventListener("paste", (event) => {
      for (const item of event.clipboardData.items) {
        if (item.kind === "file") { attach(item.getAsFile()); event.preventDefault(); }
      }
    });
    document.addEventListener("dragover", (event) => {
      event.preventDefault();
      document.body.classList.add("dragging");
    });
    document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      document.body.classList.remove("dragging");
      for (const file of event.dataTransfer.files) attach(file);
    });
  }

  function submit() {
    const input = $("input");
    const text = input.value;
    if (!text.trim() || state.controller) return;
    input.value = "";
    input.style.height = "auto";
    send(text).catch((error) => showError(`error: ${error.message}`));
  }

  function applyInfo() {
    $("model").textContent = state.info.model;
    $("model").title = `${state.info.backend}, context ${state.info.context}, ` +
      `${state.info.prompt_format} (click to switch models)`;
    $("thinking-label").hidden = !state.info.can_think;
    $("attach").hidden = !state.info.media.length;
    const defaults = state.info.sampling;
    for (const name of ["temperature", "top_k", "top_p", "min_p"]) {
      $(name).placeholder = String(defaults[name]);
    }
    $("max_tokens").placeholder = state.info.max_tokens ? String(state.info.max_tokens)
      : "until it stops";
  }

  async function start() {
    wire();
    if (!token) {
      showError("this page needs the token in the URL that `gemma ui` printed");
      return;
    }
    try {
      state.info = await api("/ui/api/info");
    } catch (error) {
      showError(`error: ${error.message}`);
      return;
    }
    applyInfo();
    await refreshList();
    const open = localStorage.getItem("gemma-chat-open");
    if (open && [...$("list").children].some((li) => li.dataset.id === open)) {
      await openConversation(open);
    }
    $("input").focus();
    document.body.dataset.ready = "1";
  }

  window.addEventListener("DOMContentLoaded", start);
})();
