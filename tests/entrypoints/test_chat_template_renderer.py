"""Chat templates render in a child process, bounded in time and memory (tiny llama tokenizer).

* The text is exactly what the tokenizer's own ``apply_chat_template`` gives, tools and template
  variables included.
* A template that raises, or reaches for Python internals (the sandbox refuses), is a
  :class:`ChatTemplateError` with its message.
* A template that loops for hours is stopped at the deadline, one that allocates 10 GB at its memory
  limit: both are :class:`ChatTemplateLimitError`, the child is replaced, and the next render works.
* The child is a fresh interpreter without torch; a tokenizer that cannot load fails start-up.
* Over HTTP: tests/entrypoints/openai/test_chat_template_limits.py.
"""

from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from llmserve.entrypoints.chat_template_renderer import (ChatTemplateError, ChatTemplateLimitError,
                                                         ChatTemplateRenderer)

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
            "{% if tools %}[{{ tools | length }} tools]{% endif %}{{ extra | default('') }}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
# Renders nothing, so only time grows (a loop that printed would reach the memory limit first on a fast machine).
HOURS_OF_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% set k = i + j %}{% endfor %}{% endfor %}"
TEN_GIGABYTES = "{{ 'x' * 10000000000 }}"
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def renderer(llama_dir, tokenizer):
    renderer = ChatTemplateRenderer(llama_dir, tokenizer_class=type(tokenizer), timeout=2.0)
    yield renderer
    renderer.close()


def test_renders_what_the_tokenizer_renders(renderer, tokenizer):
    for tools, kwargs, prompt in [(None, None, True), (TOOLS, {"extra": "!"}, False)]:
        expected = tokenizer.apply_chat_template(CONVERSATION, tools=tools, chat_template=TEMPLATE, tokenize=False,
                                                 add_generation_prompt=prompt, **(kwargs or {}))
        assert renderer.render(CONVERSATION, tools, TEMPLATE, prompt, kwargs) == expected
    assert renderer.render(CONVERSATION, None, TEMPLATE, True, None) == "<system>Be brief.<user>Hi<assistant>"


@pytest.mark.parametrize("template, fragment", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
])
def test_template_errors_are_reported(renderer, template, fragment):
    with pytest.raises(ChatTemplateError, match=fragment) as info:
        renderer.render(CONVERSATION, None, template, True, None)
    assert not isinstance(info.value, ChatTemplateLimitError)


@pytest.mark.parametrize("template, fragment", [(HOURS_OF_LOOPS, "did not finish within 2 s"),
                                                (TEN_GIGABYTES, "MiB")], ids=["time", "memory"])
def test_a_template_past_its_limits_is_stopped_and_replaced(renderer, template, fragment):
    start = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match=fragment):
        renderer.render(CONVERSATION, None, template, True, None)
    assert time.monotonic() - start < 10
    assert renderer.render(CONVERSATION, None, TEMPLATE, True, None).endswith("<assistant>")


def test_the_child_is_light_it_loads_no_torch(renderer):
    renderer.wait_started()
    maps = open(f"/proc/{renderer._process.pid}/maps").read()
    assert "libtorch" not in maps


def test_without_the_class_it_loads_the_tokenizer_as_the_server_does(llama_dir, tokenizer):
    renderer = ChatTemplateRenderer(llama_dir, timeout=2.0)
    try:
        expected = tokenizer.apply_chat_template(CONVERSATION, chat_template=TEMPLATE, tokenize=False,
                                                 add_generation_prompt=True)
        assert renderer.render(CONVERSATION, None, TEMPLATE, True, None) == expected
    finally:
        renderer.close()


def test_a_tokenizer_that_cannot_load_fails_start_up_with_the_reason(tmp_path):
    renderer = ChatTemplateRenderer(tmp_path / "missing")
    with pytest.raises(RuntimeError, match="did not start: ValueError: could not load a tokenizer"):
        renderer.wait_started()
