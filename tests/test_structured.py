"""Structured output: JSON and JSON-schema constrained decoding (llguidance) on llama.cpp and
MLX with the real 270M model, through `gemma run`, the OpenAI API and Ollama's API; and the
pure translation of each API's request fields, without a model."""

from __future__ import annotations

import json

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from conftest import run_gemma, serving  # noqa: E402

from gemma_chat.backends.base import SamplingParams  # noqa: E402
from gemma_chat.errors import InvalidArgument  # noqa: E402
from gemma_chat.server import APIError  # noqa: E402
from gemma_chat.server.ollama import format_schema  # noqa: E402
from gemma_chat.server.openai import response_format  # noqa: E402
from gemma_chat.structured import ANY_OBJECT, closed_objects, parse_schema  # noqa: E402

#: Nested objects, enums, arrays, bounds, a pattern, required and optional fields.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "address"],
}
PROMPT = "<bos>A customer record in JSON:"


# -- without a model ----------------------------------------------------------------------------

def test_objects_that_list_their_properties_get_no_others():
    closed = closed_objects({**SCHEMA, "properties": {
        **SCHEMA["properties"], "extra": {"type": "object", "additionalProperties": True,
                                          "properties": {"x": {"type": "integer"}}},
        "literal": {"const": {"properties": {"kept": 1}}}}})
    assert closed["additionalProperties"] is False
    assert closed["properties"]["address"]["additionalProperties"] is False
    assert closed["properties"]["extra"]["additionalProperties"] is True  # said explicitly
    assert closed["properties"]["literal"]["const"] == {"properties": {"kept": 1}}
    assert "additionalProperties" not in closed_objects(ANY_OBJECT)


def test_schema_from_text_or_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SCHEMA))
    assert parse_schema(str(path)) == SCHEMA == parse_schema(json.dumps(SCHEMA))
    for bad, words in (("{nope", "not valid JSON"), (str(tmp_path / "missing.json"),
                                                     "cannot read"), ("[1, 2]", "cannot read")):
        with pytest.raises(InvalidArgument, match=words):
            parse_schema(bad)
    path.write_text("[1]")
    with pytest.raises(InvalidArgument, match="must be a JSON object"):
        parse_schema(str(path))


def test_openai_response_format():
    assert response_format({}) is None
    assert response_format({"response_format": {"type": "text"}}) is None
    assert response_format({"response_format": {"type": "json_object"}}) == ANY_OBJECT
    assert response_format({"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "strict": True, "schema": SCHEMA}}}) == SCHEMA
    for bad in ({"type": "xml"}, "json", {"type": "json_schema", "json_schema": {"schema": 3}}):
        with pytest.raises(APIError) as info:
            response_format({"response_format": bad})
        assert info.value.status == 400 and info.value.param == "response_format"


def test_ollama_format():
    assert format_schema({}) is None and format_schema({"format": ""}) is None
    assert format_schema({"format": "json"}) == ANY_OBJECT
    assert format_schema({"format": SCHEMA}) == SCHEMA
    with pytest.raises(APIError, match="invalid format"):
        format_schema({"format": "yaml"})


# -- the real model -----------------------------------------------------------------------------

def _valid(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


@pytest.mark.slow
def test_50_seeded_generations_validate_on_llama_cpp(backend):
    from gemma_chat.structured import json_constraint

    constraint = json_constraint(backend, SCHEMA)
    ids = backend.tokenize(PROMPT)
    colours = set()
    for seed in range(50):
        chunks = list(backend.stream(ids, SamplingParams(temperature=1.0, seed=seed,
                                                         max_tokens=256),
                                     constraint=constraint))
        assert chunks[-1].stats.stop_reason == "stop", seed
        colours.add(_valid("".join(c.text for c in chunks))["colour"])
    assert len(colours) > 1  # sampled, not one forced answer


@pytest.mark.slow
def test_seeded_generations_validate_on_mlx_in_parallel_slots(mlx_270m):
    """MLX on a CPU runs the 270M at about 2 tokens/s: 8 generations, 4 at a time through
    the parallel slots (which carry each request's constraint)."""
    pytest.importorskip("mlx_lm")
    from gemma_chat.backends.mlx import MLXBackend
    from gemma_chat.backends.mlx_slots import MlxSlotEngine
    from gemma_chat.resolve import resolve
    from gemma_chat.structured import json_constraint

    backend = MLXBackend(resolve("gemma-3-270m", ("mlx",)), n_ctx=4 * 512)
    engine = MlxSlotEngine(backend, 4)
    try:
        constraint = json_constraint(backend, SCHEMA)
        ids = backend.tokenize(PROMPT)
        streams = [engine.stream(ids, SamplingParams(temperature=1.0, seed=seed,
                                                     max_tokens=200), constraint=constraint)
                   for seed in range(8)]
        for stream in streams:
            chunks = list(stream)
            assert chunks[-1].stats.stop_reason == "stop"
            _valid("".join(c.text for c in chunks))
    finally:
        engine.close()
        backend.close()


@pytest.mark.slow
def test_gemma_run_json_schema_and_format(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    result = run_gemma("run", "--json-schema", str(path), "--seed", "3", "A customer record:")
    assert result.returncode == 0, result.stderr
    _valid(result.stdout)
    anything = run_gemma("run", "--format", "json", "--seed", "4", "-n", "200", "Data:")
    assert isinstance(json.loads(anything.stdout), dict)
    bad = run_gemma("run", "--json-schema", '{"type": "string", "format": "color-xyz"}', "x")
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: unsupported JSON schema: Unknown format: color-xyz"


@pytest.mark.slow
def test_openai_and_ollama_clients_get_valid_json_from_parallel_slots(gguf_path):
    """Through `gemma serve` with parallel slots: the openai client's response_format
    (json_schema, streamed; json_object) and Ollama's format; an unsupported schema is a 400
    that names what it does not support."""
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")
    from gemma_chat.backends.llamacpp import LlamaCppBackend
    from gemma_chat.backends.slots import SlotEngine
    from gemma_chat.resolve import resolve
    from gemma_chat.server import create_app

    backend = LlamaCppBackend(resolve(str(gguf_path)), n_ctx=2 * 2048)
    backend.release_context()
    engine = SlotEngine(backend, 2)
    try:
        with serving(create_app(backend, ["gemma-3-270m"], engine=engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            messages = [{"role": "user", "content": "A customer record, please."}]
            fmt = {"type": "json_schema", "json_schema": {"name": "customer", "schema": SCHEMA}}
            stream = client.chat.completions.create(model="gemma-3-270m", messages=messages,
                                                    response_format=fmt, seed=1, stream=True)
            _valid("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
            # Any JSON object: a text completion (the demo is a pretrained model).
            whole = client.completions.create(model="gemma-3-270m", prompt="Data:", seed=4,
                                              max_tokens=200,
                                              extra_body={"response_format": {
                                                  "type": "json_object"}})
            assert whole.choices[0].finish_reason == "stop"
            assert isinstance(json.loads(whole.choices[0].text), dict)
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="gemma-3-270m", messages=messages,
                                               response_format={"type": "json_schema",
                                               "json_schema": {"name": "x", "schema": {
                                                   "type": "string", "format": "color-xyz"}}})
            assert "color-xyz" in str(info.value)
            reply = ollama.Client(host=url).chat(model="gemma-3-270m", messages=messages,
                                                 format=SCHEMA, options={"seed": 3})
            _valid(reply.message.content)
    finally:
        engine.close()
        backend.close()
