"""The schema corpus (tests/schema_corpus.py) on the default model: every schema is either
refused before generating, naming its keywords, or its completed answer validates."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from llama_cpp import LlamaPool
from schema_corpus import CORPUS, KEYWORDS, keywords_of, run_ours

# Enough for every corpus answer that the model closes; a longer one is cut and not judged.
MAX_TOKENS = 96
# The share of schemas that must be accepted: refusing everything would pass the rest.
MIN_ACCEPTED = 0.85
# The share of accepted schemas whose answer must complete (not cut at MAX_TOKENS).
MIN_COMPLETED = 0.8
# Schemas with a keyword that only validation enforces (uniqueItems over free strings; the
# formats schema_to_grammar has no pattern for, and does not refuse: email, ipv4): their
# answer may break the schema, and must then raise SchemaValidationError, not be returned.
VALIDATION_ONLY = frozenset({"arr-unique-strings", "fmt-email", "fmt-ipv4"})


@pytest.fixture(scope="module")
def pool(default_model_path: Path) -> Iterator[LlamaPool]:
    with LlamaPool(default_model_path, pool_size=8, n_ctx=384, n_threads=2) as pool:
        yield pool


def test_the_corpus_covers_every_keyword_of_draft_2020_12() -> None:
    assert len(CORPUS) >= 100
    assert len({case.name for case in CORPUS}) == len(CORPUS)
    used = set().union(*(keywords_of(case.schema) for case in CORPUS))
    assert sorted(KEYWORDS - used) == []
    for case in CORPUS:
        jsonschema.validators.validator_for(
            case.schema, default=jsonschema.Draft202012Validator
        ).check_schema(case.schema)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 5 CPU-minutes: far longer on a loaded machine
def test_every_answer_validates_or_the_schema_is_refused(pool: LlamaPool) -> None:
    results = run_ours(pool, CORPUS, MAX_TOKENS)
    counts = Counter(r.status for r in results)
    # "invalid": SchemaValidationError was raised (run_ours never returns an invalid answer).
    invalid = [(r.case.name, r.detail) for r in results if r.status == "invalid"]
    assert [name for name, _ in invalid if name not in VALIDATION_ONLY] == [], invalid
    for result in results:
        if result.status == "refused":
            assert result.detail.startswith("#"), result  # JSON pointers of the keywords
    accepted = len(results) - counts["refused"]
    assert accepted >= MIN_ACCEPTED * len(results), counts
    assert counts["valid"] >= MIN_COMPLETED * accepted, counts
