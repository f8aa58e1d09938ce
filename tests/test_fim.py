"""Fill-in-the-middle: create_completion(prompt, suffix=...) on a tiny model with FIM tokens.

The tiny model's next token depends only on the last one, and its successor of FIM_MID is
"X" (then "Y", "Z", EOS): a greedy completion reads "XYZ" exactly when the prompt ends with
FIM_MID, while a plain prompt "ab" goes on through the alphabet.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import FrontEnd
from llama_cpp import InvalidArgumentError, Llama, LlamaPool
from llama_cpp.fim import fim_prompt, repo_context, repo_infill_prompt
from llama_cpp.testing import (
    BOS_ID,
    FIM_MID_ID,
    FIM_PRE_ID,
    FIM_REP_ID,
    FIM_SEP_ID,
    FIM_SUF_ID,
    SPACE_ID,
    TinyModelSpec,
    byte_token,
)
from llama_cpp.testing import write_tiny_llama as write
from llama_cpp.testing.tiny_models import chain


def _spec(*, add_space_prefix: bool = False) -> TinyModelSpec:
    successors = {**TinyModelSpec().successors, FIM_MID_ID: byte_token(ord("X")), **chain("XYZ")}
    return TinyModelSpec(fim=True, add_space_prefix=add_space_prefix, successors=successors)


def _bytes(text: str) -> list[int]:
    return [byte_token(b) for b in text.encode()]


#: The infill prompt of prefix "ab" and suffix "cd".
AB_CD = [BOS_ID, FIM_PRE_ID, *_bytes("ab"), FIM_SUF_ID, *_bytes("cd"), FIM_MID_ID]


@pytest.fixture(scope="module")
def fim_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("fim") / "fim.gguf", _spec())


@pytest.fixture
def fim(fim_model_path: Path) -> Iterator[Llama]:
    with Llama(fim_model_path, n_ctx=256, n_batch=64, verbose=False) as llm:
        yield llm


@pytest.fixture(params=["llama", "pool"])
def fim_front(request: pytest.FixtureRequest, fim_model_path: Path) -> Iterator[FrontEnd]:
    """The FIM model behind each front end: a Llama, and a LlamaPool of 2 sequences."""
    target: Llama | LlamaPool
    if request.param == "llama":
        target = Llama(fim_model_path, n_ctx=256, n_batch=64, verbose=False)
    else:
        target = LlamaPool(fim_model_path, pool_size=2, n_ctx=256, n_batch=64, verbose=False)
    with target:
        yield target


def test_model_reports_its_fim_tokens(fim: Llama, gemma: Llama) -> None:
    model = fim.model
    assert (model.token_fim_pre, model.token_fim_suf, model.token_fim_mid) == (261, 262, 263)
    assert (FIM_PRE_ID, FIM_SUF_ID, FIM_MID_ID) == (261, 262, 263)
    assert (model.token_fim_pad, model.token_fim_rep, model.token_fim_sep) == (-1, -1, -1)
    assert fim.detokenize([FIM_PRE_ID, FIM_SUF_ID, FIM_MID_ID], special=True) == (
        b"<|fim_prefix|><|fim_suffix|><|fim_middle|>"
    )
    # Gemma 3 has no FIM tokens at all.
    other = gemma.model
    fim_tokens = [other.token_fim_pre, other.token_fim_suf, other.token_fim_mid]
    assert [*fim_tokens, other.token_fim_pad, other.token_fim_rep, other.token_fim_sep] == [-1] * 6


def test_fim_prompt_is_bos_pre_prompt_suf_suffix_mid(fim: Llama) -> None:
    assert fim_prompt(fim.model, "ab", "cd") == AB_CD
    assert fim_prompt(fim.model, b"ab", b"cd") == AB_CD
    # Token ids are used as they are (no BOS of their own).
    assert fim_prompt(fim.model, _bytes("ab"), _bytes("cd")) == AB_CD
    assert fim_prompt(fim.model, "", "") == [BOS_ID, FIM_PRE_ID, FIM_SUF_ID, FIM_MID_ID]
    # Special-token text in the prompt stays text: the FIM tokens are the only control tokens.
    assert fim_prompt(fim.model, "<|fim_middle|>", "") == [
        BOS_ID,
        FIM_PRE_ID,
        *_bytes("<|fim_middle|>"),
        FIM_SUF_ID,
        FIM_MID_ID,
    ]


def test_with_a_space_prefix_the_prompt_keeps_it_and_the_suffix_does_not(tmp_path: Path) -> None:
    # SentencePiece with add_space_prefix (Code Llama): "<PRE> prefix<SUF>suffix<MID>".
    path = write(tmp_path / "spm.gguf", _spec(add_space_prefix=True))
    with Llama(path, vocab_only=True, verbose=False) as llm:
        assert llm.tokenize("cd", add_bos=False) == [SPACE_ID, *_bytes("cd")]
        assert fim_prompt(llm.model, "ab", "cd") == [
            BOS_ID,
            FIM_PRE_ID,
            SPACE_ID,
            *_bytes("ab"),
            FIM_SUF_ID,
            *_bytes("cd"),
            FIM_MID_ID,
        ]
        # A space the suffix really starts with is kept.
        assert fim_prompt(llm.model, "ab", " x")[-3:] == [SPACE_ID, byte_token(ord("x")), FIM_MID_ID]


def test_create_completion_fills_the_middle(fim_front: FrontEnd) -> None:
    response = fim_front.create_completion("ab", suffix="cd", max_tokens=10, temperature=0)
    assert response["choices"][0]["text"] == "XYZ"
    assert response["choices"][0]["finish_reason"] == "stop"
    assert response["usage"] == {
        "prompt_tokens": len(AB_CD),
        "completion_tokens": 3,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    # Without the suffix the same prompt is a plain completion: the alphabet goes on.
    plain = fim_front.create_completion("ab", max_tokens=3, temperature=0)
    assert plain["choices"][0]["text"] == "cde"


def test_the_kv_cache_holds_exactly_the_infill_prompt(fim: Llama) -> None:
    response = fim.create_completion("ab", suffix="cd", max_tokens=1, temperature=0)
    assert isinstance(response, dict)
    assert response["usage"]["prompt_tokens"] == len(AB_CD)
    assert fim.input_ids.tolist()[: len(AB_CD)] == AB_CD


def test_token_prompts_and_streaming(fim_front: FrontEnd) -> None:
    response = fim_front.create_completion(_bytes("ab"), suffix="cd", max_tokens=10, temperature=0)
    assert response["choices"][0]["text"] == "XYZ"
    assert response["usage"]["prompt_tokens"] == len(AB_CD)
    chunks = list(fim_front.create_completion("ab", suffix="cd", max_tokens=10, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == "XYZ"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_echo_returns_the_prompt_and_the_middle(fim_front: FrontEnd) -> None:
    # As llama-cpp-python: the text before the gap, then the generated middle.
    response = fim_front.create_completion("ab", suffix="cd", max_tokens=10, temperature=0, echo=True)
    assert response["choices"][0]["text"] == "abXYZ"
    chunks = list(
        fim_front.create_completion("ab", suffix="cd", max_tokens=10, temperature=0, echo=True, stream=True)
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abXYZ"


def test_logprobs_cover_the_middle(fim_front: FrontEnd) -> None:
    response = fim_front.create_completion("ab", suffix="cd", max_tokens=10, temperature=0, logprobs=1)
    logprobs = response["choices"][0]["logprobs"]
    assert logprobs is not None
    assert logprobs["tokens"] == ["X", "Y", "Z"]
    assert logprobs["text_offset"] == [0, 1, 2]


def test_echo_with_logprobs_and_suffix_is_refused(fim_front: FrontEnd) -> None:
    message = "echo with logprobs cannot be combined with suffix"
    with pytest.raises(InvalidArgumentError, match=message):
        fim_front.create_completion("ab", suffix="cd", max_tokens=1, echo=True, logprobs=1)


def test_a_model_without_fim_tokens_refuses_a_suffix(gemma: Llama) -> None:
    assert gemma.model.token_fim_pre == -1
    message = r"this model has no FIM_PRE, FIM_SUF, FIM_MID token"
    with pytest.raises(InvalidArgumentError, match=message):
        gemma.create_completion("def add(a, b):", suffix="    return c", max_tokens=1)
    with pytest.raises(InvalidArgumentError, match=message):
        fim_prompt(gemma.model, "a", "b")


def test_both_front_ends_refuse_a_suffix_without_fim_tokens(front: FrontEnd) -> None:
    with pytest.raises(InvalidArgumentError, match="this model has no FIM_PRE, FIM_SUF, FIM_MID token"):
        front.create_completion("a", suffix="b", max_tokens=1)


def test_the_repository_context_is_llama_servers(tmp_path: Path, fim: Llama) -> None:
    # llama-server's format_prompt_infill: FIM_REP "myproject\n", each chunk behind FIM_SEP and
    # its file name, FIM_SEP "filename\n" for the edited file; without FIM_REP / FIM_SEP, a
    # "--- snippet ---" line ahead of each chunk. Then the last `budget` tokens of all that.
    chunks = [("a.py", "x = 1"), ("b.py", "y")]
    spaced = [byte_token(ord("x")), SPACE_ID, byte_token(ord("=")), SPACE_ID, byte_token(ord("1"))]
    with Llama(
        write(tmp_path / "repo.gguf", replace(_spec(), fim_repo=True)), n_ctx=256, verbose=False
    ) as repo:
        assert (repo.model.token_fim_rep, repo.model.token_fim_sep) == (FIM_REP_ID, FIM_SEP_ID)
        context = repo_context(repo.model, chunks)
        assert context == [
            FIM_REP_ID, *_bytes("myproject\n"),
            FIM_SEP_ID, *_bytes("a.py\n"), *spaced,
            FIM_SEP_ID, *_bytes("b.py\n"), *_bytes("y"),
            FIM_SEP_ID, *_bytes("filename\n"),
        ]  # fmt: skip
        assert repo_context(repo.model, []) == [
            FIM_REP_ID,
            *_bytes("myproject\n"),
            FIM_SEP_ID,
            *_bytes("filename\n"),
        ]

        def infill(prefix: str, suffix: str, prompt: str = "", **sizes: int) -> list[int]:
            return repo_infill_prompt(repo.model, prefix, suffix, prompt, chunks, **sizes)

        assert infill("ab", "cd", n_ctx=4096, n_batch=512, n_predict=-1) == context + AB_CD
        # llama-server's budget: the window less a batch and twice n_predict (256 - 64 - 180).
        assert infill("ab", "cd", n_ctx=256, n_batch=64, n_predict=90) == context[-12:] + AB_CD
        assert infill("ab", "cd", n_ctx=256, n_batch=64, n_predict=200) == AB_CD
        # Ours too: room for one token after the prompt (40 - 6 - 1, where the budget is 34).
        assert infill("ab", "cd", n_ctx=40, n_batch=8, n_predict=-1) == [
            *context[-33:],
            *AB_CD[:5],
            FIM_MID_ID,
        ]
        # The prefix keeps its last 3 x (n_batch // 4) tokens, the suffix its first
        # n_batch // 4 - 2 - len(prompt); `prompt` follows the prefix.
        cut = infill("0123456789abcdef", "ghijkl", n_ctx=4096, n_batch=16, n_predict=-1)
        assert cut == [
            *context,
            BOS_ID,
            FIM_PRE_ID,
            *_bytes("456789abcdef"),
            FIM_SUF_ID,
            *_bytes("gh"),
            FIM_MID_ID,
        ]
        cut = infill("0123456789abcdef", "ghijkl", "x", n_ctx=4096, n_batch=16, n_predict=-1)
        assert cut == [
            *context,
            BOS_ID,
            FIM_PRE_ID,
            *_bytes("456789abcdefx"),
            FIM_SUF_ID,
            *_bytes("g"),
            FIM_MID_ID,
        ]
    snippet = [
        byte_token(10),
        byte_token(10),
        *[SPACE_ID if c == " " else byte_token(ord(c)) for c in "--- snippet ---"],
    ]
    assert repo_context(fim.model, chunks) == [
        *snippet,
        *_bytes("\n\n"),
        *spaced,
        *snippet,
        *_bytes("\n\n"),
        *_bytes("y"),
    ]
    assert repo_context(fim.model, []) == []
