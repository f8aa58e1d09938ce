"""The expert-routing profiler: exact counts on the tiny MoE whose routing is known, no effect on
outputs, the pool under concurrent requests, the trace, and the cache simulations."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from llama_cpp import (
    ExpertStats,
    ExpertStatsUnavailableError,
    InvalidArgumentError,
    IsolatedPool,
    Llama,
    LlamaConfig,
    LlamaPool,
    SamplingParams,
    _core,
)
from llama_cpp.experts import simulate_cache
from llama_cpp.testing import TinyMoeSpec, tiny_moe_experts, write_tiny_moe

SPEC = TinyMoeSpec()
GREEDY = SamplingParams.greedy()
ACTIVE = TinyMoeSpec(expert_scale=0.5)
LAST = SPEC.n_layer - 1


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_moe(tmp_path_factory.mktemp("moe") / "moe.gguf", SPEC)


@pytest.fixture(scope="module")
def active_moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_moe(tmp_path_factory.mktemp("moe") / "active.gguf", ACTIVE)


def expected_counts(
    all_tokens: Iterable[int], output_tokens: Iterable[int], *, k: int | None = None
) -> npt.NDArray[np.int64]:
    """Counts per layer: every layer but the last routes ``all_tokens``; llama.cpp runs the
    last layer's FFN only for the rows whose logits were asked for, ``output_tokens``."""
    counts = np.zeros((SPEC.n_layer, SPEC.n_expert), dtype=np.int64)
    for token in all_tokens:
        for layer, experts in enumerate(tiny_moe_experts(token, SPEC, k=k)[:LAST]):
            counts[layer, sorted(experts)] += 1
    for token in output_tokens:
        counts[LAST, sorted(tiny_moe_experts(token, SPEC, k=k)[LAST])] += 1
    return counts


def test_counts_are_the_known_routing_of_prompt_and_generated_tokens(moe_path: Path) -> None:
    with Llama(moe_path, n_ctx=128, profile_experts=True, verbose=False) as llm:
        prompt = llm.tokenize(b"ABCD")
        completion = llm.complete(prompt, max_tokens=6)
        decoded = llm.context.tokens()
        # The last generated token is sampled, not decoded: the KV cache holds the rest.
        assert decoded == prompt + completion.tokens[:-1]
        stats = llm.expert_stats()

    # One logits row for the prompt's last token, then one per decoded generated token.
    outputs = decoded[len(prompt) - 1 :]
    np.testing.assert_array_equal(stats.counts, expected_counts(decoded, outputs))
    assert stats.counts.dtype == np.int64
    assert stats.tokens.dtype == np.int64
    assert stats.layers == (0, 1, 2, 3)
    assert (stats.n_expert, stats.n_expert_used) == (SPEC.n_expert, SPEC.n_expert_used)
    assert stats.tokens.tolist() == [len(decoded)] * LAST + [len(outputs)]
    np.testing.assert_array_equal(stats.counts.sum(axis=1), stats.tokens * SPEC.n_expert_used)
    assert stats.trace.shape == (0, 4, SPEC.n_expert_used)  # no trace asked for


def test_a_wider_f16_moe_routes_as_its_spec_says_and_generates_the_same(
    tmp_path: Path, moe_path: Path
) -> None:
    # What benchmarks/bench_experts.py builds its larger models with: a wider hidden state and
    # F16 experts change the compute per token, not the routing the spec gives nor the text.
    import gguf

    wide = TinyMoeSpec(n_embd_min=500, expert_dtype="float16")
    path = write_tiny_moe(tmp_path / "wide.gguf", wide)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    with (
        Llama(path, n_ctx=128, profile_experts=True, verbose=False) as llm,
        Llama(moe_path, n_ctx=128, verbose=False) as narrow,
    ):
        assert llm.n_embd() == wide.n_embd == 504  # rounded up to a multiple of 2 x n_head
        prompt = llm.tokenize(b"ABCD")
        llm.eval(prompt)
        counts = np.zeros(wide.n_expert, dtype=np.int64)
        for token in prompt:
            counts[sorted(tiny_moe_experts(token, wide)[0])] += 1
        np.testing.assert_array_equal(llm.expert_stats().counts[0], counts)
        llm.reset()
        assert llm.generate("a", max_tokens=6, sampling=GREEDY) == narrow.generate(
            "a", max_tokens=6, sampling=GREEDY
        )


def test_a_reused_prefix_is_not_routed_again_and_reset_starts_over(moe_path: Path) -> None:
    with Llama(moe_path, n_ctx=128, profile_experts=True, verbose=False) as llm:
        prompt = llm.tokenize(b"ABCDEF")
        llm.eval(prompt)
        first = llm.expert_stats()
        first.reset()
        assert llm.expert_stats().counts.shape == (0, SPEC.n_expert)
        # The first copy keeps what it had.
        assert int(first.tokens[0]) == len(prompt)
        longer = prompt + llm.tokenize(b"GH", add_bos=False)
        completion = llm.complete(longer, max_tokens=3)
        assert completion.cached_tokens == len(prompt)
        stats = llm.expert_stats()
    new = longer[len(prompt) :] + completion.tokens[:-1]
    np.testing.assert_array_equal(stats.counts, expected_counts(new, [longer[-1], *completion.tokens[:-1]]))


def test_the_trace_holds_each_tokens_experts_and_keeps_the_latest(moe_path: Path) -> None:
    with Llama(moe_path, n_ctx=128, profile_experts=True, profile_experts_trace=5, verbose=False) as llm:
        prompt = llm.tokenize(b"ABCDEFG")
        llm.eval(prompt)
        llm.eval(llm.tokenize(b"H", add_bos=False))
        stats = llm.expert_stats()
        decoded = llm.context.tokens()
    assert stats.trace.dtype == np.int32
    assert stats.trace.shape == (5, 4, SPEC.n_expert_used)  # a ring: the latest 5 tokens
    assert stats.trace_total == len(decoded) == 9
    assert stats.trace_capacity == 5
    for row, token in zip(stats.trace, decoded[-5:], strict=True):
        known = tiny_moe_experts(token, SPEC)
        assert [set(experts.tolist()) for experts in row[:LAST]] == known[:LAST]
    # The last layer routed only the two output rows: the prompt's last token and "H".
    assert [set(row[LAST].tolist()) for row in stats.trace[-2:]] == [
        tiny_moe_experts(decoded[-2], SPEC)[LAST],
        tiny_moe_experts(decoded[-1], SPEC)[LAST],
    ]
    assert (stats.trace[:-2, LAST] == -1).all()


def test_outputs_are_identical_with_profiling_on_and_off(active_moe_path: Path) -> None:
    results = []
    for profile in (False, True):
        with Llama(active_moe_path, n_ctx=128, profile_experts=profile, verbose=False) as llm:
            prompt = llm.tokenize(b"ABCAB")
            llm.eval(prompt)
            logits = llm.context.logits()
            llm.reset()
            greedy = llm.complete(prompt, max_tokens=12, sampling=SamplingParams(temperature=0))
            sampled = llm.complete(prompt, max_tokens=12, sampling=SamplingParams(temperature=1, seed=7))
            results.append((logits, greedy.tokens + sampled.tokens))
            if profile:
                assert llm.expert_stats().tokens[0] > 0
    (logits_off, tokens_off), (logits_on, tokens_on) = results
    np.testing.assert_array_equal(logits_off, logits_on)
    assert tokens_off == tokens_on
    # The experts matter in this model: its logits are not the dense successor table's.
    assert np.count_nonzero(logits_off) > 2


@pytest.mark.timeout(120)
def test_pool_counts_every_request_while_stats_are_read(moe_path: Path) -> None:
    prompts = [b"ABCD", b"EFG", b"HIJKL", b"MNO", b"PQRS", b"TUV"]
    with LlamaPool(moe_path, pool_size=3, n_ctx=64, profile_experts=True, profile_experts_trace=256) as pool:
        done = threading.Event()
        reads = []

        def read_stats() -> None:
            while not done.is_set():
                stats = pool.expert_stats()
                np.testing.assert_array_equal(stats.counts.sum(axis=1), stats.tokens * SPEC.n_expert_used)
                reads.append(stats)

        reader = threading.Thread(target=read_stats)
        reader.start()
        try:
            tokenized = [pool.tokenize(p, add_bos=False) for p in prompts]
            with ThreadPoolExecutor(len(prompts)) as executor:
                completions = list(executor.map(lambda t: pool.complete(t, max_tokens=5), tokenized))
        finally:
            done.set()
            reader.join(timeout=30)
        stats = pool.expert_stats()
    assert reads
    all_tokens: list[int] = []
    outputs: list[int] = []
    for prompt, completion in zip(tokenized, completions, strict=True):
        generated = completion.tokens[:-1]  # the last one is sampled, not decoded
        all_tokens += prompt[completion.cached_tokens :] + generated
        outputs += [prompt[-1], *generated]
    np.testing.assert_array_equal(stats.counts, expected_counts(all_tokens, outputs))
    assert stats.trace_total == len(all_tokens)


def test_profiling_off_or_dense_model_raises_a_typed_error(moe_path: Path, tiny_model_path: Path) -> None:
    off = r"expert routing is not profiled: create the model with profile_experts=True"
    Unavailable = ExpertStatsUnavailableError
    with Llama(moe_path, n_ctx=64, verbose=False) as llm, pytest.raises(Unavailable, match=off):
        llm.expert_stats()
    with LlamaPool(moe_path, pool_size=1, n_ctx=64) as pool, pytest.raises(Unavailable, match=off):
        pool.expert_stats()
    dense_error = r"no experts to profile \(a dense model: llama\.expert_count is missing or 0\)"
    with (
        Llama(tiny_model_path, n_ctx=64, profile_experts=True, verbose=False) as dense,
        pytest.raises(ExpertStatsUnavailableError, match=dense_error),
    ):
        dense.expert_stats()


def test_bad_profiler_options_raise() -> None:
    with pytest.raises(InvalidArgumentError, match="profile_experts_trace needs profile_experts=True"):
        Llama("unused.gguf", profile_experts_trace=8)
    with pytest.raises(InvalidArgumentError, match=r"profile_experts_trace must be an integer >= 0, got -1"):
        Llama("unused.gguf", profile_experts=True, profile_experts_trace=-1)


def test_a_trace_over_1_gib_is_refused_before_anything_is_allocated(moe_path: Path) -> None:
    # Python: a plain bound on the tokens (4 bytes a token at the least), before loading.
    with pytest.raises(
        InvalidArgumentError, match=r"profile_experts_trace must be <= 268435456 .*got 2305843009213693952"
    ):
        LlamaConfig(profile_experts=True, profile_experts_trace=2**61)
    with pytest.raises(InvalidArgumentError, match=r"must be <= 268435456"):
        Llama("unused.gguf", profile_experts=True, profile_experts_trace=2**28 + 1)
    # C++, the exact bound from the model: 4 layers x top-2 x 4 = 32 bytes a token.
    limit = _core.EXPERT_TRACE_MAX_BYTES // 32
    message = (
        rf"profile_experts_trace={limit + 1} is too large: the trace takes 32 bytes a token \(n_layer 4 x "
        rf"n_expert_used 2 x 4\) and is limited to 1 GiB \(1073741824 bytes\): at most {limit} tokens"
    )
    with pytest.raises(InvalidArgumentError, match=message):
        Llama(moe_path, n_ctx=64, profile_experts=True, profile_experts_trace=limit + 1, verbose=False)
    with pytest.raises(InvalidArgumentError, match=message):
        LlamaPool(moe_path, pool_size=1, n_ctx=64, profile_experts=True, profile_experts_trace=limit + 1)
    # Past what Python checks, at the native boundary: 2**61 x 32 bytes wraps around in size_t.
    model = _core.Model(str(moe_path), _core.ModelOptions())
    try:
        options = _core.ContextOptions()
        options.n_ctx = 64
        options.profile_experts = True
        options.profile_experts_trace = 2**61
        with pytest.raises(
            InvalidArgumentError, match=r"profile_experts_trace=2305843009213693952 is too large"
        ):
            _core.Context(model, options)
    finally:
        model.close()


def test_an_overridden_expert_used_count_is_profiled_with_its_top_k(moe_path: Path) -> None:
    k = 3
    with Llama(
        moe_path,
        n_ctx=64,
        kv_overrides={"llama.expert_used_count": k},
        profile_experts=True,
        profile_experts_trace=16,
        verbose=False,
    ) as llm:
        prompt = llm.tokenize(b"ABCDE")
        llm.eval(prompt)
        stats = llm.expert_stats()
    assert stats.n_expert_used == k
    np.testing.assert_array_equal(stats.counts, expected_counts(prompt, [prompt[-1]], k=k))
    np.testing.assert_array_equal(stats.counts.sum(axis=1), stats.tokens * k)
    assert stats.trace.shape == (len(prompt), 4, k)
    for row, token in zip(stats.trace, prompt, strict=True):
        assert [set(experts.tolist()) for experts in row[:LAST]] == tiny_moe_experts(token, SPEC, k=k)[:LAST]


def test_snapshot_and_reset_is_one_step(moe_path: Path) -> None:
    with Llama(moe_path, n_ctx=128, profile_experts=True, profile_experts_trace=8, verbose=False) as llm:
        prompt = llm.tokenize(b"ABCDEF")
        llm.eval(prompt)
        before = llm.expert_stats(reset=True)
        after_reset = llm.expert_stats()
        more = llm.tokenize(b"GH", add_bos=False)
        llm.eval(more)
        after = llm.expert_stats()
    # The snapshot has everything before the reset; the counting starts from zero after it.
    np.testing.assert_array_equal(before.counts, expected_counts(prompt, [prompt[-1]]))
    assert before.trace_total == len(prompt) == before.trace.shape[0]
    assert (after_reset.layers, after_reset.counts.shape, after_reset.trace_total) == (
        (),
        (0, SPEC.n_expert),
        0,
    )
    np.testing.assert_array_equal(after.counts, expected_counts(more, [more[-1]]))
    assert after.trace_total == len(more)


@pytest.mark.timeout(120)
def test_pool_snapshots_with_reset_lose_no_token(moe_path: Path) -> None:
    prompts = [b"ABCD", b"EFG", b"HIJKL", b"MNO", b"PQRS", b"TUV"]
    with LlamaPool(moe_path, pool_size=3, n_ctx=64, profile_experts=True) as pool:
        done = threading.Event()
        total = np.zeros((SPEC.n_layer, SPEC.n_expert), dtype=np.int64)
        reads = 0

        def add(stats: ExpertStats) -> None:
            for row, layer in enumerate(stats.layers):
                total[layer] += stats.counts[row]

        def read_stats() -> None:
            nonlocal reads
            while not done.is_set():
                add(pool.expert_stats(reset=True))
                reads += 1

        reader = threading.Thread(target=read_stats)
        reader.start()
        try:
            tokenized = [pool.tokenize(p, add_bos=False) for p in prompts]
            with ThreadPoolExecutor(len(prompts)) as executor:
                completions = list(executor.map(lambda t: pool.complete(t, max_tokens=5), tokenized))
        finally:
            done.set()
            reader.join(timeout=30)
        add(pool.expert_stats(reset=True))
    assert reads > 1
    all_tokens: list[int] = []
    outputs: list[int] = []
    for prompt, completion in zip(tokenized, completions, strict=True):
        generated = completion.tokens[:-1]
        all_tokens += prompt[completion.cached_tokens :] + generated
        outputs += [prompt[-1], *generated]
    np.testing.assert_array_equal(total, expected_counts(all_tokens, outputs))


def test_an_isolated_pool_refuses_profile_experts(moe_path: Path) -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"an IsolatedPool does not profile expert routing .*use a LlamaPool"
    ):
        IsolatedPool(moe_path, pool_size=1, n_ctx=64, profile_experts=True)


def synthetic(trace: list[list[int]], *, n_expert: int = 4) -> ExpertStats:
    """Stats of one layer with top-1 routing whose tokens went to ``trace``'s experts."""
    routes = np.array(trace, dtype=np.int32).reshape(len(trace), 1, -1)
    counts = np.zeros((1, n_expert), dtype=np.int64)
    for experts in trace:
        for expert in experts:
            counts[0, expert] += 1
    return ExpertStats(
        counts=counts,
        tokens=np.array([len(trace)], dtype=np.int64),
        layers=(0,),
        n_expert=n_expert,
        n_expert_used=routes.shape[2],
        trace=routes,
        trace_total=len(trace),
        trace_capacity=len(trace),
    )


def test_lru_and_lfu_on_a_hand_computed_trace() -> None:
    # Capacity 2, top-1. A B A C B A:
    #   LRU: A miss, B miss, A hit, C miss (evicts B), B miss (evicts A), A miss (evicts C): 1 hit.
    #   LFU: A miss, B miss, A hit (A:2), C miss (evicts B, 1 use), B miss (B:2, evicts C, 1 use),
    #        A hit: 2 hits.
    stats = synthetic([[0], [1], [0], [2], [1], [0]])
    lru = stats.simulate_cache("lru", capacity=2)
    lfu = stats.simulate_cache("lfu", capacity=2)
    assert (lru.hits.tolist(), lru.lookups.tolist(), lru.hit_rate) == ([1], [6], 1 / 6)
    assert (lfu.hits.tolist(), lfu.lookups.tolist(), lfu.hit_rate) == ([2], [6], 2 / 6)
    # Static-hot keeps the two most used, A (3) and B (2): 5 of 6.
    hot = stats.simulate_cache("static-hot", capacity=2)
    assert (hot.hits.tolist(), hot.hit_rate) == ([5], 5 / 6)
    assert stats.hot(2).tolist() == [[0, 1]]


def test_lfu_breaks_ties_by_recency_and_keeps_the_frequent_expert() -> None:
    # Capacity 2: A B C, all used once; LFU evicts the least recent (A), so A misses again.
    assert simulate_cache(np.array([[[0]], [[1]], [[2]], [[0]]]), "lfu", 2)[0].tolist() == [0]
    # A cycle one longer than the cache: LRU never hits, nor does LFU (its ties go by recency).
    cycle = np.array([[[e]] for e in [0, 1, 2] * 4])
    assert simulate_cache(cycle, "lru", 2)[0].tolist() == [0]
    assert simulate_cache(cycle, "lfu", 2)[0].tolist() == [0]
    # A A A B C B C A. LRU: m h h m m(evicts A) h h m = 4. LFU keeps A (3 uses) and thrashes
    # B/C in the other slot: m h h m m(evicts B) m(evicts C) m(evicts B) h = 3.
    trace = np.array([[[e]] for e in [0, 0, 0, 1, 2, 1, 2, 0]])
    assert simulate_cache(trace, "lru", 2)[0].tolist() == [4]
    assert simulate_cache(trace, "lfu", 2)[0].tolist() == [3]


def reference_replay(experts: list[int], lfu: bool, capacity: int) -> int:
    """The specification, one min() a miss: evict the fewest uses, ties the least recent."""
    cache: list[int] = []  # recency order, oldest first
    uses: dict[int, int] = {}
    hits = 0
    for expert in experts:
        uses[expert] = uses.get(expert, 0) + 1
        if expert in cache:
            hits += 1
            cache.remove(expert)
        elif len(cache) >= capacity:
            cache.remove(min(cache, key=uses.__getitem__) if lfu else cache[0])
        cache.append(expert)
    return hits


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_replays_match_the_specification_on_random_traces(policy: str) -> None:
    rng = np.random.default_rng(5)
    for capacity in (1, 2, 3, 7):
        # Skewed routing (repeats and ties), top-2, 2 layers, some slots unrouted.
        trace = rng.zipf(1.5, size=(3000, 2, 2)).astype(np.int64) % 16
        trace[rng.random(trace.shape) < 0.05] = -1
        hits, lookups = simulate_cache(trace, policy, capacity)
        for layer in range(2):
            experts = [int(e) for e in trace[:, layer, :].ravel() if e >= 0]
            assert (hits[layer], lookups[layer]) == (
                reference_replay(experts, policy == "lfu", capacity),
                len(experts),
            )


def test_top_k_lookups_skip_unrouted_slots_and_layers_are_independent() -> None:
    # Two layers, top-2. Layer 1 did not route the first token (-1, as the last layer does).
    trace = np.array(
        [
            [[0, 1], [-1, -1]],
            [[1, 2], [3, 0]],
            [[0, 1], [3, 0]],
        ]
    )
    hits, lookups = simulate_cache(trace, "lru", 2)
    # Layer 0, capacity 2: 0 m, 1 m, 1 h, 2 m (evicts 0), 0 m (evicts 1), 1 m (evicts 2): 1 hit
    # of 6. Layer 1: 3 m, 0 m, 3 h, 0 h: 2 of 4.
    assert (hits.tolist(), lookups.tolist()) == ([1, 2], [6, 4])


def test_entropy_shares_and_bad_arguments() -> None:
    uniform = synthetic([[0], [1], [2], [3]])
    assert uniform.entropy().tolist() == [2.0]
    assert uniform.shares().tolist() == [[0.25] * 4]
    single = synthetic([[2], [2]])
    assert single.entropy().tolist() == [0.0]
    with pytest.raises(InvalidArgumentError, match="policy must be one of lru, lfu, static-hot; got 'fifo'"):
        uniform.simulate_cache("fifo", 2)
    with pytest.raises(InvalidArgumentError, match="capacity must be an integer >= 1, got 0"):
        uniform.simulate_cache("lru", 0)
    with pytest.raises(InvalidArgumentError, match="k must be an integer >= 1, got 0"):
        uniform.hot(0)
    with pytest.raises(ExpertStatsUnavailableError, match="not collected from a model"):
        uniform.reset()
    untraced = ExpertStats(
        counts=uniform.counts,
        tokens=uniform.tokens,
        layers=(0,),
        n_expert=4,
        n_expert_used=1,
        trace=np.zeros((0, 1, 1), dtype=np.int32),
    )
    with pytest.raises(ExpertStatsUnavailableError, match="profile_experts_trace=N"):
        untraced.simulate_cache("lru", 2)
    assert untraced.simulate_cache("static-hot", 1).hit_rate == 0.25
    assert set(untraced.to_dict()["cache"]) == {"capacity", "static-hot"}
    # Policies asked for by name: only those; one that needs the trace says why it has none.
    asked = untraced.to_dict(simulate=["lru"], cache_capacity=2)["cache"]
    assert asked["capacity"] == 2
    assert asked["lru"]["available"] is False
    assert "profile_experts_trace=N" in asked["lru"]["reason"]
    assert set(uniform.to_dict(simulate=[])["cache"]) == {"capacity"}
    assert set(uniform.to_dict(simulate=["lfu", "static-hot"])["cache"]) == {"capacity", "lfu", "static-hot"}
    with pytest.raises(InvalidArgumentError, match="policy must be one of lru, lfu, static-hot; got 'fifo'"):
        uniform.to_dict(simulate=["fifo"])
