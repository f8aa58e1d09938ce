"""Memory safety at the boundary: nothing reads a closed model, and closing never frees
memory under a call running in another thread. Risky cases run in a subprocess, so that a
crash fails the test instead of killing pytest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy
import pytest

from conftest import run_python
from llama_cpp import ClosedError, GrammarError, InvalidArgumentError, Llama, LlamaGrammar, LlamaState, _core
from llama_cpp.frontend import FrontEnd


def test_every_model_method_raises_closed_error_once_closed(tiny_model_path: Path) -> None:
    result = run_python(
        """
        import sys
        from llama_cpp import ClosedError, Llama

        llm = Llama(sys.argv[1], n_ctx=64)
        m = llm.model
        llm.close()
        calls = {
            "is_eog": lambda: m.is_eog(10**6),  # out of range: read the freed vocabulary before
            "is_eog_0": lambda: m.is_eog(0),
            "n_vocab": lambda: m.n_vocab,
            "token_bos": lambda: m.token_bos,
            "token_eos": lambda: m.token_eos,
            "add_bos": lambda: m.add_bos,
            "add_eos": lambda: m.add_eos,
            "n_ctx_train": lambda: m.n_ctx_train,
            "n_embd": lambda: m.n_embd,
            "size": lambda: m.size,
            "tokenize": lambda: m.tokenize(b"abc", True, False),
            "detokenize": lambda: m.detokenize([10**6], False),
            "token_to_piece": lambda: m.token_to_piece(10**6, False),
            "metadata": lambda: m.metadata(),
            "description": lambda: m.description(),
            "chat_template": lambda: m.chat_template(),
        }
        for name, call in calls.items():
            try:
                call()
            except ClosedError as e:
                print(name, "ClosedError", e)
            except Exception as e:
                print(name, type(e).__name__, e)
            else:
                print(name, "returned")
        print(repr(m))
        """,
        str(tiny_model_path),
    )
    assert result.returncode == 0, result.stderr
    names = [
        "is_eog",
        "is_eog_0",
        "n_vocab",
        "token_bos",
        "token_eos",
        "add_bos",
        "add_eos",
        "n_ctx_train",
        "n_embd",
        "size",
        "tokenize",
        "detokenize",
        "token_to_piece",
        "metadata",
        "description",
        "chat_template",
    ]
    expected = [f"{name} ClosedError the model is closed" for name in names]
    assert result.stdout.splitlines() == [*expected, f"<Model '{tiny_model_path}' (closed)>"]


def test_check_grammar_keeps_the_model_alive_while_another_thread_closes_it(tiny_model_path: Path) -> None:
    # A grammar big enough that parsing it takes a while, and whose token literals make the
    # parser read the vocabulary, checked in a loop while the main thread closes the model:
    # every check either completes or raises ClosedError.
    result = run_python(
        """
        import sys, threading
        from llama_cpp import ClosedError, Llama, _core

        rules = "\\n".join(f'r{i} ::= "x{i}" <end_of_turn> | "y" r{i + 1}' for i in range(20000))
        grammar = 'root ::= r0\\n' + rules + '\\nr20000 ::= "end"\\n'
        outcomes = set()
        for _ in range(10):
            llm = Llama(sys.argv[1], n_ctx=64)
            model = llm.model
            started = threading.Event()

            def check() -> None:
                try:
                    while True:
                        _core.check_grammar(model, grammar, "root")
                        outcomes.add("checked")
                        started.set()  # the next check is running when close() comes
                except ClosedError:
                    outcomes.add("closed")

            worker = threading.Thread(target=check)
            worker.start()
            started.wait()
            llm.close()
            worker.join(timeout=60)
            assert not worker.is_alive()
        print(sorted(outcomes))
        """,
        str(tiny_model_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("'closed']")


def test_check_grammar_on_a_closed_model(tiny_model_path: Path) -> None:
    model = Llama(tiny_model_path, n_ctx=64).model
    model.close()
    assert model.closed
    model.close()  # idempotent
    with pytest.raises(ClosedError, match=r"^the model is closed$"):
        _core.check_grammar(model, 'root ::= "x"', "root")


def test_load_state_wants_a_llama_state(tiny: Llama) -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"^load_state expects a LlamaState \(from save_state\(\)\), got bytes$"
    ):
        tiny.load_state(b"not a state")  # type: ignore[arg-type]
    state = tiny.save_state()
    assert isinstance(state, LlamaState)
    tiny.load_state(state)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (None, "prompt must be str, bytes or a sequence of token ids, got NoneType"),
        (5, "prompt must be str, bytes or a sequence of token ids, got int"),
        ({1: 2}, "prompt must be str, bytes or a sequence of token ids, got dict"),
        ("a\ud800", r"prompt has no UTF-8 form \(surrogates not allowed\)"),
        ([1, 2**40], "token id 1099511627776 is out of range"),
        ([1, -1], "token id -1 is out of range"),
        ([1, True], "token ids must be ints, got True"),
        ([1, 2.0], "token ids must be ints, got 2.0"),
        (["a"], "token ids must be ints, got 'a'"),
    ],
)
def test_hostile_prompts_raise_invalid_argument(front: FrontEnd, prompt: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        front.create_completion(prompt, max_tokens=1)
    with pytest.raises(InvalidArgumentError, match=message):
        front.create_completion(prompt, max_tokens=1, stream=True)


def test_token_ids_from_numpy(front: FrontEnd) -> None:
    # Typed as Sequence[int], which an array is not; a flat integer array works.
    ids: Any = numpy.array([1, 2], dtype=numpy.int32)
    assert front.create_completion(ids, max_tokens=1)["choices"]
    bad: list[Any] = [numpy.array(5), numpy.array([[1, 2]]), numpy.array([1.5])]
    for prompt in bad:
        with pytest.raises(
            InvalidArgumentError, match=r"prompt must be a flat sequence|token ids must be ints"
        ):
            front.create_completion(prompt, max_tokens=1)


def test_hostile_chat_messages_raise_invalid_argument(front: FrontEnd) -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"messages\[1\] is not JSON with a UTF-8 form: .*surrogates not allowed"
    ):
        front.create_chat_completion(
            [
                {"role": "user", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "\udc00"}]},
            ],
            max_tokens=1,
        )
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(
        InvalidArgumentError, match=r"tools\[0\] is not JSON with a UTF-8 form: maximum recursion"
    ):
        front.create_chat_completion(
            [{"role": "user", "content": "hi"}],
            max_tokens=1,
            tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "x": deep}}}
            ],
        )


def test_grammar_from_what_is_not_text_raises_grammar_error() -> None:
    for value in (None, 5, b'root ::= "a"'):
        with pytest.raises(GrammarError, match="expected GBNF text"):
            LlamaGrammar.from_string(value)  # type: ignore[arg-type]
