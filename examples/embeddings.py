"""Embed texts and rank them by cosine similarity to a query.

Run from the repository root after `make demo`: python examples/embeddings.py
"""

import numpy as np

from llama_cpp import Llama

DOCUMENTS = ["The cat sleeps on the sofa.", "Stock markets fell sharply today.", "A kitten naps on a couch."]

with Llama("models/gemma-3-270m-q4_k_m.gguf", embedding=True, pooling_type=1) as llm:
    # A list of inputs with pooling gives one float32 array of shape (n_inputs, n_embd).
    vectors = llm.embed(["Where is the cat resting?", *DOCUMENTS], normalize=True)
    assert isinstance(vectors, np.ndarray)
    query, documents = vectors[0], vectors[1:]
    scores = documents @ query  # unit vectors: dot products are cosine similarities
    for i in np.argsort(-scores):
        print(f"{scores[i]:.3f}  {DOCUMENTS[i]}")
