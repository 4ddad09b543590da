"""The conversation (token-level history, KV reuse, trimming) on the real model."""

from __future__ import annotations

import pytest

from gemma_chat import template
from gemma_chat.backends.base import SamplingParams
from gemma_chat.backends.llamacpp import LlamaCppBackend
from gemma_chat.chat import Conversation
from gemma_chat.errors import ContextOverflow
from gemma_chat.resolve import resolve

pytestmark = pytest.mark.slow  # the real model, a subprocess or a converter


GREEDY = SamplingParams(temperature=0, max_tokens=8)


def reply(convo: Conversation, text: str, sampling: SamplingParams = GREEDY) -> str:
    return "".join(chunk.text for chunk in convo.send(text, sampling))


def test_each_turn_evaluates_only_its_new_tokens(backend):
    convo = Conversation(backend, system="You are terse.")
    reply(convo, "Name a colour.")
    reply(convo, "Name another one.")
    before_turn_3 = convo.ids
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
        + "".join(template.turn_parts("user", "Be brief.\n\nHi there"))
        + "".join(template.turn_parts("assistant", replies[0]))
        + "".join(template.turn_parts("user", "How are you?"))
        + "".join(template.turn_parts("assistant", replies[1]))
    )
    assert backend.detokenize(convo.ids, special=True) == expected
    # ... which is the official rendering, up to the whitespace the template strips.
    assert convo.render() == template.render(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": replies[0]},
         {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": replies[1]}],
        add_generation_prompt=False)
    assert convo.ids.count(backend.info.bos_id) == 1


def test_closing_a_stream_early_keeps_what_was_taken(backend):
    convo = Conversation(backend)
    stream = convo.send("Tell me a story", SamplingParams(temperature=0, max_tokens=50))
    taken = [next(stream).text, next(stream).text]
    stream.close()  # what Ctrl-C does
    last = convo.exchanges[-1]
    assert last.interrupted and last.reply == "".join(taken)
    reply(convo, "Go on")
    assert not convo.exchanges[-1].interrupted
    assert convo.last_stats.cached_tokens > 0


def test_undo_and_retry(backend):
    convo = Conversation(backend)
    first = reply(convo, "Count: one, two,")
    reply(convo, "Then?")
    assert convo.undo().user == "Then?"
    assert len(convo.exchanges) == 1
    retried = "".join(c.text for c in convo.retry(GREEDY))
    assert retried == first  # greedy: the same reply again
    assert len(convo.exchanges) == 1
    assert convo.last_stats.prompt_eval_tokens <= 2  # the prompt was all in the KV cache


def test_context_trimming_drops_oldest_exchanges_never_the_system(gguf_path):
    with LlamaCppBackend(resolve(str(gguf_path)), n_ctx=256) as small:
        convo = Conversation(small, system="SYSTEM-NOTE")
        sampling = SamplingParams(temperature=0, max_tokens=16)
        for i in range(6):
            reply(convo, f"message {i}: " + "tea and cake " * 8, sampling)
        assert convo.dropped >= 1
        assert convo.exchanges[-1].user.startswith("message 5")
        assert not any(ex.user.startswith("message 0") for ex in convo.exchanges)
        text = small.detokenize(convo.ids, special=True)
        assert text.startswith("<bos><start_of_turn>user\nSYSTEM-NOTE\n\nmessage ")
        assert len(convo.ids) <= 256
        with pytest.raises(ContextOverflow, match="context holds 256"):
            list(convo.send("word " * 400, sampling))
        assert convo.exchanges[-1].user.startswith("message 5")  # nothing recorded


@pytest.mark.parametrize("swa_full", [False, True])
def test_rollback_past_the_sliding_window_matches_a_fresh_evaluation(gguf_path, swa_full):
    """Gemma 3 270M's sliding window is 512 tokens: roll a 700+ token conversation back past
    it, then check the next reply against one computed from an empty KV cache. A window-sized
    cache (the default) must notice it cannot roll back that far and re-evaluate; a full-size
    one re-uses its prefix."""
    backend = LlamaCppBackend(resolve(str(gguf_path)), n_ctx=4096, swa_full=swa_full)
    convo = Conversation(backend)
    sampling = SamplingParams(temperature=0, max_tokens=12)
    # Long enough that the window cache (512 positions plus a batch) has evicted the start.
    for i in range(6):
        reply(convo, f"Part {i}. " + "The river runs to the sea and back again. " * 25,
              sampling)
    assert len(convo.ids) > 1600
    for _ in range(5):
        convo.undo()  # back to ~280 tokens: far past the 512-token window from the end
    reused = "".join(c.text for c in convo.send("Summarize.", sampling))
    stats = convo.last_stats
    if swa_full:
        assert stats.cached_tokens > 100 and stats.cache_note == ""
    else:
        assert stats.cached_tokens == 0 and "sliding-window" in stats.cache_note
    # A small roll-back (within the window) re-uses the cache either way.
    retried = "".join(c.text for c in convo.retry(sampling))
    assert retried == reused and convo.last_stats.cached_tokens > 100
    assert convo.last_stats.cache_note == ""
    convo.undo()
    backend.trim_cache(0)
    fresh = "".join(c.text for c in convo.send("Summarize.", sampling))
    assert convo.last_stats.cached_tokens == 0
    assert convo.last_stats.token_ids == stats.token_ids and fresh == reused
    backend.close()
