"""The conversation (token-level history, KV reuse) and the chat loop, on the real model."""

from __future__ import annotations

import io

from conftest import run_gemma

from gemma_chat import template
from gemma_chat.backends.base import SamplingParams
from gemma_chat.chat import Conversation
from gemma_chat.repl import chat_loop

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def reply(convo: Conversation, text: str) -> str:
    return "".join(chunk.text for chunk in convo.send(text, GREEDY))


def test_each_turn_evaluates_only_its_new_tokens(backend):
    convo = Conversation(backend, system="You are terse.")
    reply(convo, "Name a colour.")
    first = convo.last_stats
    assert first.prompt_eval_tokens == first.prompt_tokens or first.cached_tokens > 0
    reply(convo, "Name another one.")
    before_turn_3 = list(convo.ids)
    reply(convo, "And a third?")
    third = convo.last_stats
    new_tokens = third.prompt_tokens - len(before_turn_3)
    # Only the new user turn, plus the reply's last token and <end_of_turn>\n, which the
    # cache has not seen (generation stopped before evaluating them).
    assert new_tokens < third.prompt_eval_tokens <= new_tokens + 3
    assert third.prompt_eval_tokens < third.prompt_tokens // 3


def test_token_history_spells_the_rendered_template(backend):
    convo = Conversation(backend, system="Be brief.")
    replies = [reply(convo, "Hi there"), reply(convo, "How are you?")]
    expected = (
        template.BOS
        + template.render_turn("user", "Be brief.\n\nHi there")
        + template.render_turn("assistant", replies[0])
        + template.render_turn("user", "How are you?")
        + template.render_turn("assistant", replies[1])
    )
    assert backend.detokenize(convo.ids, special=True) == expected
    # ... which is the official rendering, up to the whitespace the template strips.
    assert convo.render() == template.render(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": replies[0]},
         {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": replies[1]}],
        add_generation_prompt=False)
    assert convo.ids.count(backend.info.bos_id) == 1


def test_chat_loop_commands_and_turns(backend):
    out, notes = io.StringIO(), []
    convo = Conversation(backend)
    lines = ["Hello", "/help", "/nope", "", "Tell me more", "/exit", "never read"]
    replies = chat_loop(backend, convo, GREEDY, lines, out=out, note=notes.append)
    assert replies == 2
    assert len(convo.messages) == 4 and out.getvalue().count("\n") >= 2
    assert any("/clear" in n for n in notes)
    assert any("unknown command /nope" in n for n in notes)
    chat_loop(backend, convo, GREEDY, ["/clear"], out=out, note=notes.append)
    assert convo.messages == [] and convo.ids == []


class InterruptingOut(io.StringIO):
    """Raises KeyboardInterrupt once, at the second write: Ctrl-C in the middle of a reply."""

    writes = 0

    def write(self, text):
        self.writes += 1
        if self.writes == 2:
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_keeps_the_partial_reply_and_goes_on(backend):
    convo = Conversation(backend)
    notes: list[str] = []
    out = InterruptingOut()
    replies = chat_loop(backend, convo, SamplingParams(temperature=0, max_tokens=50),
                        ["Tell me a long story"], out=out, note=notes.append)
    assert replies == 0 and any("interrupted" in n for n in notes)
    assert convo.interrupted
    partial = convo.messages[-1]["content"]
    assert partial and out.getvalue() == partial + "\n"
    # The conversation goes on from the partial reply, re-using the cache.
    text = reply(convo, "Go on")
    assert text and not convo.interrupted
    assert convo.last_stats.cached_tokens > 0


def test_context_overflow_leaves_the_conversation_intact(gguf_path):
    from gemma_chat.backends.llamacpp import LlamaCppBackend
    from gemma_chat.resolve import resolve

    with LlamaCppBackend(resolve(str(gguf_path)), n_ctx=256) as small:
        convo = Conversation(small)
        notes: list[str] = []
        chat_loop(small, convo, GREEDY, ["word " * 400, "hi"], out=io.StringIO(),
                  note=notes.append)
        assert any("context holds 256" in n for n in notes)
        assert [m["content"] for m in convo.messages][0] == "hi"


def test_piped_chat_end_to_end(gguf_path):
    result = run_gemma("chat", "--temp", "0", "-n", "6",
                       input="Hello\nWhat is the capital of France?\n/bye\nnot reached\n")
    assert result.returncode == 0, result.stderr
    assert "using gemma-3-270m (the bundled demo model)" in result.stderr
    assert "pretrained (base) model" in result.stderr
    assert result.stdout.strip() and "\x1b[" not in result.stdout
    assert "Traceback" not in result.stderr
