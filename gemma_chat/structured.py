"""Structured output: generation constrained to JSON, or to a JSON schema, on both backends.

    constraint = json_constraint(backend, schema)     # schema: a dict, or None for any object
    for chunk in backend.stream(ids, sampling, constraint=constraint):
        ...                                           # text that parses (and validates)

The grammar engine is llguidance, for both backends: it compiles a JSON schema to a grammar and
gives, before each token, the set of tokens that keep the output valid, as a bitmask over the
vocabulary (a few tens of microseconds a token for a schema like the ones in the tests). The
backend sets every other token's logit to -inf before its sampler runs, so the sampler's own
settings (temperature, top-k, seeds) still apply among the allowed tokens, and the end of
generation is allowed only once the JSON is complete. llguidance has tokenizer adapters for
llama.cpp vocabularies and Hugging Face tokenizers; llama.cpp's own grammar sampler would only
serve one backend. The constraint compiles the schema once and makes a fresh matcher per
generation (:meth:`JsonConstraint.matcher`).

The JSON is compact (``", "`` and ``": "``, no other whitespace): a free choice of whitespace
lets a small model indent forever. An object schema that lists its ``properties`` and says
nothing of ``additionalProperties`` gets no others (as in llama.cpp's schema converter and
OpenAI's strict mode): JSON Schema's default, any other key, lets a model invent keys until it
runs out of tokens. A schema llguidance cannot compile is refused with a one-line error naming
what it does not support.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InvalidArgument, MissingDependency

#: "Any JSON object" (``--json``, ``response_format: json_object``, Ollama's ``format: "json"``).
ANY_OBJECT: dict[str, Any] = {"type": "object"}

_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise MissingDependency("llguidance is not installed: pip install llguidance") from None
    return llguidance


def parse_schema(text: str) -> dict:
    """A schema given on the command line: a JSON text, or the path of a file holding one."""
    from pathlib import Path

    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"cannot read the schema file {text}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        schema = json.loads(source)
    except ValueError as exc:
        raise InvalidArgument(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument("a JSON schema must be a JSON object")
    return schema


class JsonConstraint:
    """A compiled grammar (a JSON schema's, or a Lark one) for one backend's vocabulary."""

    def __init__(self, tokenizer, grammar: str, n_vocab: int, schema: Mapping | None = None):
        self._tokenizer = tokenizer
        self._grammar = grammar
        self.n_vocab = n_vocab
        self.schema = dict(schema) if schema is not None else None

    def matcher(self) -> Matcher:
        """The state of one generation under this constraint."""
        llguidance = _llguidance()
        return Matcher(llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0),
                       self.n_vocab)


class TriggeredConstraint:
    """A grammar that applies only from a trigger token on, as often as the trigger comes:
    text is free until the model writes ``trigger``, then the grammar holds until it is
    complete, then text is free again (a tool call in the middle of a reply). With ``start``
    (token ids) generation begins inside the grammar, those tokens already taken."""

    def __init__(self, inner: JsonConstraint, trigger: int, start: list[int] | None = None):
        self.inner, self.trigger, self.start = inner, trigger, start
        self.n_vocab = inner.n_vocab

    def matcher(self) -> TriggeredMatcher:
        return TriggeredMatcher(self)


class TriggeredMatcher:
    """One generation's place under a :class:`TriggeredConstraint`."""

    def __init__(self, constraint: TriggeredConstraint):
        self._c = constraint
        self._inner: Matcher | None = None
        self.n_vocab = constraint.n_vocab
        if constraint.start is not None:
            self._begin(constraint.start)

    def _begin(self, ids: list[int]) -> None:
        self._inner = self._c.inner.matcher()
        for token in ids:
            self._inner.accept(token)

    def allowed(self) -> np.ndarray | None:
        """The tokens allowed next; None while text is free."""
        return self._inner.allowed() if self._inner is not None else None

    def mask(self, logits: np.ndarray) -> None:
        if self._inner is not None:
            self._inner.mask(logits)

    def accept(self, token: int) -> None:
        if self._inner is None:
            if token == self._c.trigger:
                self._begin([])
            return
        self._inner.accept(token)
        if self._inner.done:
            self._inner = None

    @property
    def done(self) -> bool:
        return False


class Matcher:
    """One generation's place in the grammar: which tokens may come next."""

    def __init__(self, matcher, n_vocab: int):
        self._m = matcher
        self.n_vocab = n_vocab
        self._bits = np.zeros(((n_vocab + 31) // 32,), dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """A boolean mask over the vocabulary: the tokens allowed next."""
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[:self.n_vocab].astype(bool)

    def mask(self, logits: np.ndarray) -> None:
        """Set the logit of every token not allowed next to -inf, in place."""
        logits[~self.allowed()[:logits.shape[-1]]] = -np.inf

    def accept(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise InvalidArgument(f"the JSON grammar failed: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The JSON is complete and nothing more may follow."""
        return self._m.is_stopped()


def json_constraint(backend, schema: Mapping | None = None) -> JsonConstraint:
    """Compile ``schema`` (None: any JSON object) for ``backend``'s vocabulary; the
    backend's end-of-generation tokens end the output once the JSON is complete."""
    llguidance = _llguidance()
    schema = dict(schema) if schema is not None else ANY_OBJECT
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(closed_objects(schema),
                                                                overrides=_OPTIONS)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"unsupported JSON schema: {_first_line(exc)}") from None
    if not hasattr(backend, "grammar_tokenizer"):
        raise InvalidArgument(f"the {backend.info.backend} backend has no structured output")
    tokenizer = backend.grammar_tokenizer()
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise InvalidArgument(f"unsupported JSON schema: {_first_line(messages[0])}")
    return JsonConstraint(tokenizer, grammar, backend.info.n_vocab, schema)


def lark_constraint(backend, grammar: str) -> JsonConstraint:
    """Compile a Lark grammar (llguidance's dialect: ``<[ID]>`` is the token ID) for
    ``backend``'s vocabulary; an error in it is a bug here, raised as such."""
    llguidance = _llguidance()
    if not hasattr(backend, "grammar_tokenizer"):
        raise InvalidArgument(f"the {backend.info.backend} backend has no constrained decoding")
    tokenizer = backend.grammar_tokenizer()
    compiled = llguidance.grammar_from("lark", grammar)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled, tokenizer)
    if is_error:
        raise ValueError(f"invalid grammar: {messages[0]}")
    return JsonConstraint(tokenizer, compiled, backend.info.n_vocab)


def closed_objects(schema):
    """``schema`` with ``additionalProperties: false`` wherever an object lists its properties
    and says nothing of others (see the module docstring)."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: (value if key in ("enum", "const", "default", "examples")
                    else closed_objects(value)) for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
