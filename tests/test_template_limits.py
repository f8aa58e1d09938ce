"""Hostile chat templates (docs/hardening.md, "Hostile chat templates"): a template comes from
the GGUF's metadata, so a file can carry one that loops, recurses or blows up. Each ends in
TemplateError, the process stays up, and real templates render exactly as before.

Templates that would hang or crash the process if a guard failed run in a subprocess, so that
a failure fails the test instead of killing pytest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import run_python
from llama_cpp import InvalidArgumentError, Llama, _core
from llama_cpp.errors import TemplateError
from llama_cpp.families import detect_family
from llama_cpp.testing import write_tiny_llama
from llama_cpp.testing.tiny_models import TinyModelSpec

MESSAGES = [{"role": "user", "content": "hi"}]

# The issue's two templates.
RANGE_LOOP = "{% for i in range(100000000) %}x{% endfor %}"
SELF_RECURSIVE = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
# Passes every static check (the recursion goes through a parameter, the loops' lengths come
# from the request), so only the run-time guards can stop it.
HIGHER_ORDER_RECURSION = "{% macro a(g) %}{{ g(g) }}{% endmacro %}{{ a(a) }}"
RUNAWAY_LOOPS = (
    "{% set n = n if n is defined else 1 %}"
    "{% for i in range(n) %}{% for j in range(n) %}{% for k in range(n) %}"
    "{% endfor %}{% endfor %}{% endfor %}{{ messages[0].content }}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city."},
                    "units": {"type": "string", "enum": ["c", "f"]},
                    "options": {
                        "type": "object",
                        "properties": {
                            "days": {"type": "integer"},
                            "tags": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                },
                "required": ["city"],
            },
        },
    }
]


def model_with_template(directory: Path, template: str) -> Path:
    """A tiny GGUF whose ``tokenizer.chat_template`` is ``template``."""
    return write_tiny_llama(directory / "hostile.gguf", TinyModelSpec(chat_template=template))


@pytest.fixture(scope="module")
def vocab(tiny_model_path: Path) -> Iterator[_core.Model]:
    """The tiny model's vocabulary, to load templates against."""
    with Llama(tiny_model_path, vocab_only=True, verbose=False) as llm:
        yield llm.model


def render(
    model: _core.Model, template: str, messages: object = MESSAGES, tools: object = None, **limits: int
) -> str:
    request = _core.ChatRequest()
    request.messages = json.dumps(messages)
    request.tools = json.dumps(tools) if tools else ""
    return _core.ChatTemplates(model, template, **limits).apply(request).prompt


@pytest.mark.parametrize("template", [RANGE_LOOP, SELF_RECURSIVE], ids=["range-loop", "self-recursive-macro"])
def test_the_issues_templates_in_a_gguf_end_in_template_error_and_the_process_stays_up(
    tmp_path: Path, template: str
) -> None:
    path = model_with_template(tmp_path, template)
    result = run_python(
        """
        import sys
        from llama_cpp import Llama
        from llama_cpp.errors import TemplateError

        with Llama(sys.argv[1], n_ctx=64, verbose=False) as llm:
            for attempt in range(2):
                try:
                    llm.render_chat([{"role": "user", "content": "hi"}])
                except TemplateError as error:
                    print(type(error).__name__, error)
            print("alive", llm.n_vocab())
        """,
        str(path),
        timeout=60.0,
    )
    assert result.returncode == 0, result.stderr
    expected = {
        RANGE_LOOP: "TemplateError refused chat template: nested loops run 100000000 iterations, "
        "more than the limit of 100000",
        SELF_RECURSIVE: "TemplateError refused chat template: macro 'f' always calls itself (f -> f), "
        "without end",
    }[template]
    assert result.stdout.splitlines() == [expected, expected, "alive 261"]


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        (
            "{% macro a() %}{{ b() }}{% endmacro %}{% macro b() %}x{{ a() }}{% endmacro %}{{ a() }}",
            "macro 'a' always calls itself (a -> b -> a), without end",
        ),
        (
            "{% macro f() %}{% call f() %}{% endcall %}{% endmacro %}{{ f() }}",
            "macro 'f' always calls itself (f -> f), without end",
        ),
        ("{{ 'x' * 100000000 }}", "repeats a value 100000000 times, more than the limit of 100000"),
        ("{{ 100000 * 1000 * 'x' }}", "repeats a value 100000000 times, more than the limit of 100000"),
        (
            "{% for i in range(1000) %}{% for j in [1, 2, 3] %}{% for k in range(1000) %}x"
            "{% endfor %}{% endfor %}{% endfor %}",
            "nested loops run 3000000 iterations, more than the limit of 100000",
        ),
        ("{{ range(10, 1000000, 2) | length }}", "range() of 499995 items, more than the limit of 100000"),
        ("{% for m in messages %}" * 9 + "x" + "{% endfor %}" * 9, "nests loops more than 8 deep"),
        (
            "{{ " + "(" * 300 + "1" + ")" * 300 + " }}",
            "it nests brackets, blocks or operators more than 256 deep",
        ),
        ("{{ " + "not " * 300 + "1 }}", "it nests brackets, blocks or operators more than 256 deep"),
        (
            "{% if 0 %}" + "{% elif 0 %}" * 300 + "{% endif %}",
            "it nests brackets, blocks or operators more than 256 deep",
        ),
        ("{{ " + " ~ ".join(["'a'"] * 300) + " }}", "its syntax tree is nested more than 256 deep"),
        ("x" * (1 << 20) + "x", "is 1048577 bytes, more than the limit of 1048576"),
        ("{% set __llama_cpp_macro_depth = 1 %}", "uses the reserved name __llama_cpp_macro_depth"),
    ],
    ids=[
        "mutual-recursion",
        "recursion-through-call-block",
        "string-repetition",
        "repetition-by-constant-expression",
        "nested-loop-product",
        "range-with-step",
        "loops-nested-9-deep",
        "brackets",
        "nots",
        "elifs",
        "operator-chain",
        "oversized",
        "reserved-name",
    ],
)
def test_abuse_is_refused_before_any_render(vocab: _core.Model, template: str, reason: str) -> None:
    # Refused by the static checks, before llama.cpp (whose init renders the template) sees it.
    with pytest.raises(TemplateError) as caught:
        _core.ChatTemplates(vocab, template)
    assert str(caught.value) == f"refused chat template: {reason}"


@pytest.mark.parametrize(
    "statement", ["{% include 'x.jinja' %}", "{% import 'x.jinja' as x %}", "{% extends '/etc/passwd' %}"]
)
def test_templates_cannot_read_files(vocab: _core.Model, statement: str) -> None:
    # llama.cpp's engine has no loader: include/import/extends do not parse.
    keyword = statement.split()[1]
    with pytest.raises(TemplateError) as caught:
        _core.ChatTemplates(vocab, statement)
    assert str(caught.value) == f"invalid chat template: Unknown statement: {keyword}"
    assert isinstance(caught.value, InvalidArgumentError)


def test_recursion_through_a_parameter_stops_at_the_macro_depth_limit(tmp_path: Path) -> None:
    path = model_with_template(tmp_path, HIGHER_ORDER_RECURSION)
    result = run_python(
        """
        import sys
        from llama_cpp import Llama
        from llama_cpp.errors import TemplateError

        with Llama(sys.argv[1], n_ctx=64, verbose=False, chat_template_max_depth=20) as llm:
            try:
                llm.render_chat([{"role": "user", "content": "hi"}])
            except TemplateError as error:
                print("raised:", "macro 'a' called with more than 20 macro calls nested" in str(error))
            print("alive")
        """,
        str(path),
        timeout=60.0,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["raised: True", "alive"]


def test_the_render_stack_holds_the_deepest_macro_at_the_deepest_recursion(tmp_path: Path) -> None:
    # A macro body 250 syntax-tree levels deep (the limit is 256), calling itself at the
    # bottom of it 300 times: about 70 MiB of stack, which overflowed a fixed 64 MiB stack.
    body = "{% if n > 0 %}{{ (f(n - 1) | length)" + " + 1" * 245 + " }}{% endif %}"
    template = "{% macro f(n) %}" + body + "{% endmacro %}{{ f(300) }}"
    path = model_with_template(tmp_path, template)
    result = run_python(
        """
        import sys
        from llama_cpp import Llama

        with Llama(sys.argv[1], n_ctx=64, verbose=False, chat_template_max_depth=301) as llm:
            print(llm.render_chat([{"role": "user", "content": "hi"}]).prompt)
        """,
        str(path),
        timeout=60.0,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "248\n"  # f(0) renders "", f(1) "245", each level above len("245") + 245


def test_legitimate_recursion_within_the_depth_limit_renders(vocab: _core.Model) -> None:
    # Real templates recurse over tool schemas: depth follows the data, and the data is finite.
    template = (
        "{% macro count(n) %}{% if n > 0 %}{{ n }},{{ count(n - 1) }}{% endif %}{% endmacro %}"
        "{{ count(messages | length * 10) }}"
    )
    assert render(vocab, template) == "10,9,8,7,6,5,4,3,2,1,"
    # count(10) ... count(0): 11 calls nested.
    assert render(vocab, template, max_macro_depth=11) == "10,9,8,7,6,5,4,3,2,1,"
    with pytest.raises(TemplateError, match="macro 'count' called with more than 10 macro calls nested"):
        render(vocab, template, max_macro_depth=10)


def test_a_render_past_its_time_limit_is_refused_for_good_and_the_process_exits_cleanly(
    tmp_path: Path,
) -> None:
    # 3000**3 iterations: hours. The first render times out; the template is then refused
    # without starting another; the abandoned render still runs when the process exits with
    # its own status (an exit handler keeps static destructors from running under it).
    path = model_with_template(tmp_path, RUNAWAY_LOOPS)
    result = run_python(
        """
        import sys
        from llama_cpp import Llama
        from llama_cpp.errors import TemplateError

        llm = Llama(sys.argv[1], n_ctx=64, verbose=False, chat_template_timeout=0.5)
        messages = [{"role": "user", "content": "hi"}]
        print(llm.render_chat(messages).prompt)
        for attempt in range(2):
            try:
                llm.render_chat(messages, chat_template_kwargs={"n": 3000})
            except TemplateError as error:
                print(error)
        print("refused:", bool(llm.chat_templates().refused))
        sys.exit(3)
        """,
        str(path),
        timeout=60.0,
    )
    assert result.returncode == 3, result.stderr
    refusal = (
        "refused chat template: a render ran past the time limit of 0.5 s (it could not be stopped and runs "
        "on in the background); these templates are refused from now on"
    )
    assert result.stdout.splitlines() == ["hi", refusal, refusal, "refused: True"]


def test_loading_past_the_time_limit_is_refused_once(tmp_path: Path) -> None:
    # llama.cpp renders a template when it loads it: a runaway there times out the load, and
    # later calls get the same error without loading (and starting a render) again.
    template = "{% for i in range(90000) %}{% for j in range(90000 - i) %}{% endfor %}{% endfor %}"
    path = model_with_template(tmp_path, template)
    result = run_python(
        """
        import sys
        from llama_cpp import Llama
        from llama_cpp.errors import TemplateError

        llm = Llama(sys.argv[1], n_ctx=64, verbose=False, chat_template_timeout=0.5)
        for attempt in range(2):
            try:
                llm.render_chat([{"role": "user", "content": "hi"}])
            except TemplateError as error:
                print(error)
        """,
        str(path),
        timeout=60.0,
    )
    assert result.returncode == 0, result.stderr
    refusal = (
        "refused chat template: loading it (llama.cpp renders it to detect its capabilities) ran past the "
        "time limit of 0.5 s; the render could not be stopped and runs on in the background"
    )
    assert result.stdout.splitlines() == [refusal, refusal]


def test_a_models_tool_use_template_is_checked_and_used_for_requests_with_tools(tmp_path: Path) -> None:
    plain = "{% for m in messages %}plain:{{ m.content }}{% endfor %}"
    tool_use = (
        "{% macro schema(s) %}{{ s.type }}{% if s.properties %}("
        "{% for k, v in s.properties | items %}{{ k }}:{{ schema(v) }},{% endfor %}){% endif %}{% endmacro %}"
        "{% for t in tools or [] %}{{ t.function.name }}({{ schema(t.function.parameters) }}) {% endfor %}"
        "{% for m in messages %}tools:{{ m.content }}{% endfor %}"
    )
    spec = TinyModelSpec(chat_template=plain, tool_use_template=tool_use)
    with Llama(write_tiny_llama(tmp_path / "tools.gguf", spec), vocab_only=True, verbose=False) as llm:
        assert llm.render_chat(MESSAGES).prompt == "plain:hi"
        assert llm.render_chat(MESSAGES, tools=TOOLS).prompt == (
            "get_weather(object(city:string,units:string,options:object(days:integer,tags:array,),)) tools:hi"
        )
        assert llm.chat_templates().source() == plain
    hostile = TinyModelSpec(chat_template=plain, tool_use_template=SELF_RECURSIVE)
    hostile_path = write_tiny_llama(tmp_path / "hostile.gguf", hostile)
    with Llama(hostile_path, vocab_only=True, verbose=False) as llm, pytest.raises(TemplateError) as caught:
        llm.render_chat(MESSAGES)
    assert str(caught.value) == (
        "refused tool_use chat template: macro 'f' always calls itself (f -> f), without end"
    )
    # As llama.cpp: one that does not parse is ignored, and the default template renders all.
    broken = TinyModelSpec(chat_template=plain, tool_use_template="{% for %}")
    with Llama(write_tiny_llama(tmp_path / "broken.gguf", broken), vocab_only=True, verbose=False) as llm:
        assert llm.render_chat(MESSAGES, tools=TOOLS).prompt == "plain:hi"


def test_output_past_max_output_bytes_is_refused(vocab: _core.Model) -> None:
    # Doubling a 1 KiB string 10 times: 1 MiB from a small template, invisible to static checks.
    template = (
        "{% set ns = namespace(s='" + "x" * 1024 + "') %}"
        "{% for i in range(10) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    )
    assert render(vocab, template) == "x" * (1 << 20)
    with pytest.raises(TemplateError) as caught:
        render(vocab, template, max_output_bytes=1000)
    assert str(caught.value) == "the chat template's output is 1048576 bytes, more than max_output_bytes=1000"


def test_real_templates_render_exactly_as_without_the_guards(
    vocab: _core.Model, llama_source_dir: Path
) -> None:
    # llama.cpp's collection of real templates (12 of them recurse over tool schemas): with
    # the depth guards (the default) and without (max_macro_depth=0: the source untouched),
    # with and without tools, the prompts are identical.
    templates = sorted((llama_source_dir / "models" / "templates").glob("*.jinja"))
    assert len(templates) >= 70
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "weather?"},
    ]
    for path in templates:
        source = path.read_text()
        guarded = _core.ChatTemplates(vocab, source)
        assert guarded.source() == source
        plain = _core.ChatTemplates(vocab, source, max_macro_depth=0)
        for tools in (None, TOOLS):
            request = _core.ChatRequest()
            request.messages = json.dumps(conversation)
            request.tools = json.dumps(tools) if tools else ""
            assert guarded.apply(request).prompt == plain.apply(request).prompt, path.name


def test_the_default_and_tiny_models_templates_render_unchanged(
    default_model_path: Path, tiny_model_path: Path
) -> None:
    # The default model's GGUF has no template: its family's (families.py) is used.
    with Llama(default_model_path, vocab_only=True, verbose=False) as probe:
        template = detect_family(probe.metadata).fallback_template
    assert template is not None
    with Llama(default_model_path, vocab_only=True, verbose=False, chat_template=template) as gemma:
        assert (
            gemma.render_chat(MESSAGES).prompt
            == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
        )
        assert gemma.chat_templates().source() == template
    with Llama(tiny_model_path, vocab_only=True, verbose=False) as tiny:  # no template: ChatML
        assert tiny.render_chat(MESSAGES).prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("chat_template_timeout", 0, "chat_template_timeout must be a number of seconds > 0, got 0"),
        (
            "chat_template_timeout",
            float("inf"),
            "chat_template_timeout must be a number of seconds > 0, got inf",
        ),
        ("chat_template_max_output", 0, "chat_template_max_output must be an integer >= 1, got 0"),
        ("chat_template_max_depth", -1, "chat_template_max_depth must be an integer >= 0, got -1"),
        ("chat_template_max_depth", 513, "chat_template_max_depth must be <= 512, got 513"),
    ],
)
def test_the_limits_are_checked(tiny_model_path: Path, option: str, value: float, message: str) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(InvalidArgumentError) as caught:
        Llama(tiny_model_path, vocab_only=True, verbose=False, **options)
    assert str(caught.value) == message
