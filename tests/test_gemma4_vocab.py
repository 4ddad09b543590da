"""Gemma 4's prompt format on the real Gemma 4 vocabulary (llama.cpp's vocabulary-only GGUF):
every control token the format writes is one id, a prompt holds one BOS, and our token ids equal
llama.cpp's tokenization of the official template's string."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from gemma4_data import vocab_gguf
from test_template4 import CASES

from gemma_chat import template4
from gemma_chat.prompt import Gemma4Turns, PromptBuilder, format_for
from gemma_chat.template import Marker

pytestmark = pytest.mark.slow  # fetches the llama-cpp-python sdist on first use


class Vocabulary:
    """llama.cpp's tokenizer of a vocabulary-only GGUF, as much of a backend as prompts need."""

    def __init__(self, path):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.info = SimpleNamespace(architecture="gemma4", bos_id=self.llm.token_bos(),
                                    chat_template="", n_vocab=self.llm.n_vocab(),
                                    backend="llama.cpp")

    def grammar_tokenizer(self):
        """The vocabulary for llguidance, as the llama.cpp backend makes it (once)."""
        if getattr(self, "_grammar", None) is None:
            self._grammar = self._make_grammar_tokenizer()
        return self._grammar

    def _make_grammar_tokenizer(self):
        import warnings

        import llama_cpp
        from llguidance.llamacpp import lltokenizer_from_vocab

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return lltokenizer_from_vocab(llama_cpp.llama_model_get_vocab(self.llm.model),
                                          eos_token=[1, 106])

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=special) if text else []


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary(vocab_gguf())


def test_every_marker_is_one_control_token(vocab):
    ids = {m: vocab.tokenize(m) for m in template4.MARKERS}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == len(template4.MARKERS)
    assert ids[template4.BOS] == [vocab.info.bos_id]
    # Typed as text, the turn, think, tool-declaration, tool-response and media markers stay
    # text (they are control tokens). The thought channel, tool-call and quote markers are
    # "user-defined" tokens that Gemma 4's tokenizer matches in any text (Hugging Face's does
    # the same): a user who types them gets them, as with the official implementations.
    typed = {m: len(vocab.tokenize(m, special=False)) == 1 for m in template4.MARKERS}
    matched_in_text = {template4.CHANNEL, template4.END_CHANNEL, template4.TOOL_CALL,
                       template4.END_TOOL_CALL, template4.END_TOOL_RESPONSE, template4.QUOTE}
    assert {m for m, single in typed.items() if single} == matched_in_text


@pytest.mark.parametrize("revision", sorted(template4.REVISIONS))
def test_prompt_ids_equal_llama_cpp_on_the_official_string(vocab, revision):
    prompts = PromptBuilder(vocab, Gemma4Turns(revision))
    assert prompts.can_think and prompts.thought_ids == (vocab.tokenize("<|channel>")[0],
                                                          vocab.tokenize("<channel|>")[0])
    for messages, thinking, tools, gen in CASES:
        parts = template4.parts(messages, gen, thinking=bool(thinking), tools=tools,
                                revision=revision)
        ids = prompts.tokens(parts)
        assert ids.count(vocab.info.bos_id) == 1 and ids[0] == vocab.info.bos_id
        text = "".join(parts)
        typed = any(m in p for p in parts if not isinstance(p, Marker)
                    for m in template4.MARKERS)
        if not typed:  # (typed control-token text stays text in ours, by design)
            assert ids == vocab.tokenize(text), text


def test_the_vocabulary_file_carries_the_release_revision():
    from gemma_chat.gguf_file import read_gguf

    embedded = read_gguf(vocab_gguf()).metadata["tokenizer.chat_template"]
    fmt = format_for("gemma4", embedded)
    assert (fmt.revision, fmt.note) == ("release", "")


def test_end_of_generation_tokens_from_the_vocabulary(vocab):
    import llama_cpp

    v = vocab.llm._model.vocab
    ends = {t for t in range(vocab.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(v, t)}
    assert ends == {vocab.tokenize(t)[0] for t in ("<eos>", "<turn|>", "<|tool_response>")}


def test_the_catalogue_card_and_the_real_files_hyperparameters_agree():
    """The vocabulary GGUF carries the 26B A4B's hyperparameters (per-layer KV heads, the
    sliding pattern, 512-wide global heads): the card's KV cache estimate must match it."""
    from gemma_chat import catalog, memory
    from gemma_chat.gguf_file import read_gguf

    shape, arch = memory.shape_from_gguf(read_gguf(vocab_gguf()))
    card = catalog.get("gemma-4-26b-a4b-it")
    for n_ctx in (4096, 8192, 32768, 262144):
        assert memory.kv_cache_bytes(card.shape, card.arch, n_ctx) == \
            memory.kv_cache_bytes(shape, arch, n_ctx)
    # 5 global layers of 2 KV heads x 512 and 25 sliding ones of 8 x 256, f16 K and V.
    assert memory.kv_cache_bytes(shape, arch, 262144) == \
        5 * 262144 * 2 * 512 * 4 + 25 * (1024 + 512) * 8 * 256 * 4
