"""The Gemma chat template: exact strings, Google's reference templates, role rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemma_chat.errors import InvalidMessages
from gemma_chat.template import render

DATA = Path(__file__).parent / "data"


def reference(name: str, messages, add_generation_prompt=True) -> str:
    """Render one of Google's official chat templates in a sandboxed jinja2 environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    tmpl = env.from_string((DATA / name).read_text())
    return tmpl.render(messages=messages, bos_token="<bos>",
                       add_generation_prompt=add_generation_prompt)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "  padded question \n"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4. \n"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [{"role": "user", "content": "line one\nline two\n\n```python\nprint('x')\n```"}],
    [{"role": "user", "content": "Unicode: 日本語, émoji 🎉, tabs\tand  spaces"}],
]


def test_exact_single_turn():
    assert render([{"role": "user", "content": "Hello"}]) == (
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    )


def test_exact_multi_turn_with_system():
    text = render([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ])
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert text.count("<bos>") == 1


def test_without_generation_prompt():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert render(messages, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
    )


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_matches_google_gemma2_template(messages):
    assert render(messages) == reference("gemma2_chat_template.jinja", messages)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_matches_google_gemma3_template(messages):
    assert render(messages) == reference("gemma3_chat_template.jinja", messages)


@pytest.mark.parametrize("system", ["You are terse.", "  Leading and trailing space \n"])
def test_system_fold_matches_gemma3_template(system):
    messages = [{"role": "system", "content": system}, *CONVERSATIONS[2]]
    assert render(messages) == reference("gemma3_chat_template.jinja", messages)


def test_gemma2_reference_rejects_system_we_fold_instead():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    with pytest.raises(TemplateError):
        reference("gemma2_chat_template.jinja", messages)
    assert render(messages).startswith("<bos><start_of_turn>user\nS\n\nU<end_of_turn>")


def test_text_content_parts_match_gemma3_template():
    messages = [{"role": "user", "content": [{"type": "text", "text": " part one "},
                                             {"type": "text", "text": "part two"}]}]
    assert render(messages) == reference("gemma3_chat_template.jinja", messages)


@pytest.mark.parametrize(
    "messages, needle",
    [
        ([], "no user message"),
        ([{"role": "system", "content": "S"}], "no user message"),
        ([{"role": "assistant", "content": "A"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "first"),
        ([{"role": "tool", "content": "a"}], "unknown role"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], "without its picture"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "last message"),
    ],
)
def test_role_rules_raise_value_error(messages, needle):
    with pytest.raises(InvalidMessages, match=needle):
        render(messages)
