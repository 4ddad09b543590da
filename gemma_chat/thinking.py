"""Thoughts apart from the answer: a thinking model's stream, split by its thought channel.

    for chunk in split_thoughts(backend.stream(ids, sampling), prompts.thought_ids):
        (dim if chunk.thought else plain)(chunk.text)

Gemma 4 thinks in a channel: ``<|channel>thought\\n ... <channel|>`` and then answers. The
markers are control tokens (they stream as ids with no text), so the split is made on token
ids, never on text a model could also write. The channel's name (``thought\\n``) is not part of
the thoughts. The final chunk's stats count the thought tokens and the time spent on them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

from .backends.base import Chunk

CHANNEL_NAME = "thought\n"


def split_thoughts(chunks: Iterable[Chunk], channel: tuple[int, int] | None) -> Iterator[Chunk]:
    """``chunks`` with thought text marked (``Chunk.thought``); unchanged when ``channel`` (the
    ids that open and close the thought channel) is None."""
    if channel is None:
        yield from chunks
        return
    open_id, close_id = channel
    inside = False
    name = ""  # what is left of the channel name to skip
    start = None
    thought_tokens = 0
    thinking_s = None
    for chunk in chunks:
        if chunk.stats is not None:
            chunk.stats.thought_tokens = thought_tokens
            if start is not None:
                chunk.stats.thinking_s = thinking_s if thinking_s is not None else \
                    time.perf_counter() - start
            yield replace(chunk, thought=inside) if inside else chunk
            return
        ids = chunk.token_ids
        if open_id in ids and not inside:
            inside, name, start = True, CHANNEL_NAME, time.perf_counter()
            thought_tokens += 1
            yield replace(chunk, text="", thought=True)
            continue
        if inside and close_id in ids:
            inside = False
            thought_tokens += 1
            thinking_s = time.perf_counter() - start
            yield replace(chunk, text="", thought=True)
            continue
        if not inside:
            yield chunk
            continue
        thought_tokens += len(ids)
        text = chunk.text
        if name:
            if name.startswith(text):
                name, text = name[len(text):], ""
            elif text.startswith(name):
                text, name = text[len(name):], ""
            else:
                name = ""
        yield replace(chunk, text=text, thought=True)
