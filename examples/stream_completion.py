"""Stream a completion to the terminal, piece by piece (whole UTF-8 characters).

Run from the repository root after `make demo`: python examples/stream_completion.py
"""

from llama_cpp import Llama, SamplingParams

with Llama("models/gemma-3-270m-q4_k_m.gguf", n_ctx=1024) as llm:
    sampling = SamplingParams(temperature=0.7, top_p=0.9, seed=7)
    for piece in llm.generate_stream("A short story about a lighthouse:", max_tokens=64, sampling=sampling):
        print(piece, end="", flush=True)
    print()
