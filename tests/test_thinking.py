"""Thinking (Gemma 4), fast: thoughts split from the answer on token ids, kept out of the next
prompt exactly as the official template re-renders history, KV reuse from the start of the
last model turn, the REPL's /think, and reasoning_content in the server. Scripted backend with
Gemma 4's real control-token ids; the real-model tests are in test_gemma4."""

from __future__ import annotations

import io
import json

import pytest
from fakes import ScriptedBackend
from starlette.testclient import TestClient

from gemma_chat import repl, template4
from gemma_chat.backends.base import Chunk, SamplingParams, Stats, collect
from gemma_chat.chat import Conversation
from gemma_chat.errors import InvalidArgument
from gemma_chat.prompt import PromptBuilder
from gemma_chat.server import create_app
from gemma_chat.thinking import split_thoughts

GREEDY = SamplingParams(temperature=0)


def thinking_reply(thought: str, answer: str) -> str:
    return f"<|channel>thought\n{thought}<channel|>{answer}"


def test_thoughts_are_split_on_the_channel_token_ids():
    ids = {"<|channel>": 100, "<channel|>": 101}
    chunks = [Chunk("", (100,)), Chunk("thought", (1,)), Chunk("\n", (2,)), Chunk("Hmm", (3,)),
              Chunk(" ok", (4,)), Chunk("", (101,)), Chunk("Answer", (5,)),
              Chunk("", (), Stats(generated_tokens=7))]
    out = list(split_thoughts(chunks, (ids["<|channel>"], ids["<channel|>"])))
    # The channel's name is not a thought.
    assert "".join(c.text for c in out if c.thought) == "Hmm ok"
    assert "".join(c.text for c in out if not c.thought) == "Answer"
    assert out[-1].stats.thought_tokens == 6
    text, stats = collect(iter(out))
    assert text == "Answer"
    # No channel: nothing changes, even text that looks like one.
    plain = [Chunk("<|channel>x", (7,)), Chunk("", (), Stats())]
    assert list(split_thoughts(plain, None)) == plain


def test_a_thinking_chat_keeps_thoughts_apart_and_out_of_the_next_prompt():
    backend = ScriptedBackend(architecture="gemma4")
    replies = [thinking_reply(f"step {i} of my plan", f"Answer {i}.") for i in range(10)]
    backend.enqueue(*replies)
    convo = Conversation(backend, system="Be brief.", thinking=True)
    prompts = PromptBuilder(backend)
    evaluated = []
    for i in range(10):
        chunks = list(convo.send(f"Question {i}?", GREEDY))
        ex = convo.exchanges[-1]
        assert ex.thoughts == f"step {i} of my plan" and ex.reply == f"Answer {i}."
        assert "plan" not in "".join(c.text for c in chunks if not c.thought)
        sent = backend.prompts[-1]
        # The prompt is the official template's rendering of the conversation, token for token.
        messages = [{"role": "system", "content": "Be brief."}]
        for done in convo.exchanges[:-1]:
            messages += [{"role": "user", "content": done.user},
                         {"role": "assistant", "content": done.reply}]
        messages.append({"role": "user", "content": ex.user})
        assert sent == prompts.tokens(template4.parts(messages, thinking=True))
        assert "plan" not in backend.detokenize(sent)
        evaluated.append(convo.last_stats.prompt_eval_tokens)
        if i:
            # Re-evaluated: from the start of the previous model turn's text (its answer
            # replaces the thoughts the cache holds), the closing, and the new user turn.
            previous = convo.exchanges[-2]
            answer = backend.tokenize(previous.reply, special=False)
            turn = prompts.user_turn(ex.user, first=False, thinking=True)
            assert evaluated[-1] == len(answer) + len(prompts.closing) + len(turn)
    assert max(evaluated[1:]) - min(evaluated[1:]) <= 2  # flat over ten turns


def test_thinking_off_prefills_an_empty_channel_and_drops_it_from_history():
    backend = ScriptedBackend(architecture="gemma4").enqueue("Hi there.", "Bye.")
    convo = Conversation(backend)
    list(convo.send("Hello", GREEDY))
    first = backend.detokenize(backend.prompts[0], special=True)
    assert first.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    assert "<|think|>" not in first and "<|turn>system" not in first
    list(convo.send("Again", GREEDY))
    second = backend.detokenize(backend.prompts[1], special=True)
    assert "<|turn>model\nHi there.<turn|>\n<|turn>user\nAgain<turn|>" in second
    assert second.count("<|channel>") == 1  # only the new generation prompt's


def test_thinking_needs_a_model_that_thinks():
    convo = Conversation(ScriptedBackend())  # Gemma 3
    with pytest.raises(InvalidArgument, match="no thinking mode"):
        convo.set_thinking(True)
    convo.set_thinking(False)


def test_think_command_and_hidden_thoughts_in_the_repl():
    backend = ScriptedBackend(architecture="gemma4")
    backend.enqueue(thinking_reply("secret reasoning", "Visible answer."))
    out, err, notes = io.StringIO(), io.StringIO(), []
    app = repl.ChatApp(backend, Conversation(backend), GREEDY,
                       renderer=repl.PlainRenderer(out, err), note=notes.append,
                       show_thinking=False)
    app.run(["/think on", "Why?", "/think", "/stats"])
    assert app.conversation.thinking
    assert out.getvalue() == "Visible answer.\n"
    assert "secret" not in err.getvalue() and "thought for" in err.getvalue()
    assert any("thinking is on" in n for n in notes)
    assert any("thought for" in n and "tokens" in n for n in notes)  # /stats
    app.show_thinking = True
    backend.enqueue(thinking_reply("shown this time", "Again."))
    app.run(["More?"])
    assert "[thinking] shown this time" in err.getvalue()
    assert out.getvalue().endswith("Again.\n")


def test_think_command_on_a_model_that_cannot():
    backend = ScriptedBackend()
    notes = []
    app = repl.ChatApp(backend, Conversation(backend), GREEDY, note=notes.append)
    app.run(["/think on", "/think maybe"])
    assert "no thinking mode" in notes[0] and "usage: /think" in notes[1]
    assert not app.conversation.thinking


@pytest.fixture
def thinking_server():
    backend = ScriptedBackend(architecture="gemma4")
    with TestClient(create_app(backend, ["scripted"])) as client:
        yield backend, client


def test_server_returns_reasoning_content_apart(thinking_server):
    backend, client = thinking_server
    backend.enqueue(thinking_reply("weigh it", "Forty-two."))
    body = {"messages": [{"role": "user", "content": "Answer?"}],
            "chat_template_kwargs": {"enable_thinking": True}}
    data = client.post("/v1/chat/completions", json=body).json()
    message = data["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Forty-two.",
                       "reasoning_content": "weigh it"}
    assert "<|think|>" in backend.detokenize(backend.prompts[-1], special=True)
    backend.enqueue(thinking_reply("streamed thoughts", "Streamed."))
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "chat_template_kwargs": None,
                             "reasoning_effort": "high"}) as response:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in response.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "streamed thoughts"
    assert "".join(d.get("content", "") for d in deltas) == "Streamed."


def test_server_thinking_switch(thinking_server):
    backend, client = thinking_server
    for extra, thinks in [({}, False), ({"reasoning_effort": "none"}, False),
                          ({"chat_template_kwargs": {"enable_thinking": False}}, False),
                          ({"reasoning_effort": "low"}, True)]:
        client.post("/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "x"}], **extra})
        assert ("<|think|>" in backend.detokenize(backend.prompts[-1], special=True)) == thinks
    bad = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"})
    assert bad.status_code == 400 and "reasoning_effort" in bad.json()["error"]["message"]


def test_gemma3_server_ignores_the_thinking_switch():
    backend = ScriptedBackend().enqueue("Plain.")
    with TestClient(create_app(backend, ["scripted"])) as client:
        data = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}],
            "chat_template_kwargs": {"enable_thinking": True}}).json()
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "Plain."}
