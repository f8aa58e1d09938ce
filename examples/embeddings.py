"""Embed texts and rank them by cosine similarity to a query.

Run from the repository root after `make demo`: python examples/embeddings.py
"""

from typing import cast

from llama_cpp import Llama

DOCUMENTS = ["The cat sleeps on the sofa.", "Stock markets fell sharply today.", "A kitten naps on a couch."]

with Llama("models/gemma-3-270m-q4_k_m.gguf", embedding=True, pooling_type=1) as llm:
    # A list of inputs with pooling gives one vector each.
    vectors = cast(list[list[float]], llm.embed(["Where is the cat resting?", *DOCUMENTS], normalize=True))
    query, documents = vectors[0], vectors[1:]
    scores = [sum(q * d for q, d in zip(query, doc, strict=True)) for doc in documents]
    for score, text in sorted(zip(scores, DOCUMENTS, strict=True), reverse=True):
        print(f"{score:.3f}  {text}")
