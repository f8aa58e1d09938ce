"""logprobs: the log-softmax of the model's raw logits, with top alternatives."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from conftest import FrontEnd
from llama_cpp import InvalidArgumentError, Llama, LlamaPool, SamplingParams
from llama_cpp._options import generate_options
from llama_cpp.testing import TinyModelSpec, write_tiny_llama


def log_softmax(logits: npt.NDArray[np.float32]) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    result: np.ndarray = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    return result


def test_tiny_model_logprobs_are_exact(front: FrontEnd) -> None:
    response = front.create_completion("a", max_tokens=3, temperature=0, logprobs=2)
    logprobs = response["choices"][0]["logprobs"]
    assert logprobs is not None
    assert logprobs["tokens"] == ["b", "c", "d"]
    assert logprobs["text_offset"] == [0, 1, 2]
    # One logit is sqrt(n_embd) (the normalised one-hot state), the other 260 are zero.
    peak = math.sqrt(TinyModelSpec().n_embd)
    expected = peak - math.log(math.exp(peak) + 260)
    for value in logprobs["token_logprobs"]:
        assert value == pytest.approx(expected, abs=1e-5)
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        assert top is not None
        assert top[token] == pytest.approx(expected, abs=1e-5)
        assert max(top.values()) == top[token]


@pytest.mark.slow
def test_logprobs_equal_log_softmax_of_the_raw_logits(gemma: Llama) -> None:
    prompt = gemma.tokenize("The capital of France is")
    gemma.reset()
    sampling = SamplingParams(temperature=0.9, seed=3).to_native()
    result = gemma.context.generate(prompt, sampling, generate_options(6, None, logprobs=5))
    assert len(result.logprobs) == len(result.tokens) == 6
    # Replay the generation's own decodes (prompt, then one token at a time): the logits
    # then come out of the same kernels, and the logprobs must agree to float precision.
    gemma.reset()
    gemma.eval(prompt)
    for entry, token in zip(result.logprobs, result.tokens, strict=True):
        reference = log_softmax(gemma.context.logits())
        assert entry.token == token
        assert entry.logprob == pytest.approx(reference[token], abs=1e-5)
        best = np.argsort(-reference, kind="stable")[:5]
        assert [t for t, _ in entry.top] == [int(t) for t in best]
        assert [v for _, v in entry.top] == pytest.approx(list(reference[best]), abs=1e-5)
        gemma.eval([token])


@pytest.mark.slow
def test_echo_scores_the_prompt(gemma: Llama) -> None:
    prompt = gemma.tokenize("Paris is the capital of France")
    response = gemma.create_completion(prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    logprobs = response["choices"][0]["logprobs"]
    assert logprobs is not None
    assert len(logprobs["token_logprobs"]) == len(prompt) + 1
    assert logprobs["token_logprobs"][0] is None  # BOS: nothing before it
    assert response["choices"][0]["text"].startswith("Paris is the capital of France")
    for j in (1, len(prompt) // 2, len(prompt) - 1):
        gemma.reset()
        gemma.eval(prompt[:j])
        reference = log_softmax(gemma.context.logits())
        assert logprobs["token_logprobs"][j] == pytest.approx(reference[prompt[j]], abs=2e-3)
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets)
    assert "".join(logprobs["tokens"]) == response["choices"][0]["text"]


def test_streamed_logprobs_match_the_full_response(front: FrontEnd) -> None:
    full = front.create_completion("A", max_tokens=20, temperature=0, logprobs=1)
    chunks = list(front.create_completion("A", max_tokens=20, temperature=0, logprobs=1, stream=True))
    streamed: list[float | None] = []
    for chunk in chunks:
        part = chunk["choices"][0]["logprobs"]
        if part is not None:
            streamed += part["token_logprobs"]
    full_logprobs = full["choices"][0]["logprobs"]
    assert full_logprobs is not None
    assert streamed == full_logprobs["token_logprobs"]
    assert len(streamed) == 12  # one per byte token of "é😀世界"


def test_negative_logprobs_raise(front: FrontEnd) -> None:
    with pytest.raises(InvalidArgumentError, match="logprobs must be >= 0"):
        front.create_completion("a", logprobs=-1)


def test_echo_scores_the_prompt_on_the_tiny_model(front: FrontEnd) -> None:
    response = front.create_completion("abc", max_tokens=2, temperature=0, logprobs=1, echo=True)
    choice = response["choices"][0]
    assert choice["text"] == "abcde"
    logprobs = choice["logprobs"]
    assert logprobs is not None
    assert logprobs["tokens"] == ["", "a", "b", "c", "d", "e"]  # BOS renders as nothing
    peak = math.sqrt(TinyModelSpec().n_embd)
    expected = peak - math.log(math.exp(peak) + 260)
    # BOS has nothing before it; after BOS the model does not predict 'a' (it predicts the
    # BOS's successor), after 'a' it predicts 'b', and so on.
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["token_logprobs"][1] is not None
    assert logprobs["token_logprobs"][1] < expected
    assert logprobs["token_logprobs"][2:] == pytest.approx([expected] * 4, abs=1e-5)
    streamed = list(
        front.create_completion("abc", max_tokens=2, temperature=0, logprobs=1, echo=True, stream=True)
    )
    assert "".join(c["choices"][0]["text"] for c in streamed) == "abcde"
    first = streamed[0]["choices"][0]["logprobs"]
    assert first is not None
    assert first["token_logprobs"] == logprobs["token_logprobs"][:4]


@pytest.fixture(scope="module")
def noisy_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    spec = TinyModelSpec(logit_scale=0.0, noise=1.0, seed=11)
    return str(write_tiny_llama(tmp_path_factory.mktemp("noisy") / "noisy.gguf", spec))


def test_the_pool_samples_and_scores_like_llama(noisy_path: str) -> None:
    """Seeded sampling, logprobs and prompt scores: the same decoder gives the same answer."""
    sampling: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 7}
    with Llama(noisy_path, n_ctx=256, n_batch=64, verbose=False) as llm:
        expected = llm.create_completion("hello", max_tokens=24, logprobs=3, echo=True, **sampling)
    with LlamaPool(noisy_path, pool_size=3, n_ctx=256, n_batch=64, verbose=False) as pool:
        # Two neighbours in the same batches: a sequence's answer does not depend on them.
        others = [pool.submit("other text", max_tokens=24) for _ in range(2)]
        got = pool.create_completion("hello", max_tokens=24, logprobs=3, echo=True, **sampling)
        for other in others:
            other.close()
    assert isinstance(got, dict)
    assert isinstance(expected, dict)
    assert got["choices"][0]["text"] == expected["choices"][0]["text"]
    got_logprobs, expected_logprobs = got["choices"][0]["logprobs"], expected["choices"][0]["logprobs"]
    assert got_logprobs is not None
    assert expected_logprobs is not None
    assert got_logprobs["tokens"] == expected_logprobs["tokens"]
    assert got_logprobs["token_logprobs"][0] is None
    assert got_logprobs["token_logprobs"][1:] == pytest.approx(
        expected_logprobs["token_logprobs"][1:], abs=1e-4
    )
    assert [list(t or {}) for t in got_logprobs["top_logprobs"]] == [
        list(t or {}) for t in expected_logprobs["top_logprobs"]
    ]
