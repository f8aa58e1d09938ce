"""A script written against llama-cpp-python 0.3.36's high-level API, and nothing else.

tests/test_dropin.py runs it unchanged with llama-cpp-python and with this package and
compares what it prints; benchmarks/bench_dropin.py times it under both.
Usage: python llama_cpp_python_script.py MODEL_PATH  (prints one JSON object)
"""

import json
import sys
import time

from llama_cpp import Llama, LlamaGrammar

MODEL = sys.argv[1]
results = {}
started = time.perf_counter()

llm = Llama(
    model_path=MODEL, n_ctx=2048, n_threads=2, n_threads_batch=2, seed=1234, logits_all=True, verbose=False
)

# __call__ and create_completion, greedy
out = llm("The capital of France is", max_tokens=24, temperature=0)
results["call"] = out["choices"][0]["text"]
results["call_finish"] = out["choices"][0]["finish_reason"]
# OpenAI's three counts (ours adds prompt_tokens_details.cached_tokens, as OpenAI does)
results["call_usage"] = {
    key: out["usage"][key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")
}

# stop strings (cut, never returned) and max_tokens
out = llm.create_completion("Q: Name three colors.\nA:", max_tokens=48, temperature=0, stop=["\n", "Q:"])
results["stop"] = out["choices"][0]["text"]
results["stop_finish"] = out["choices"][0]["finish_reason"]

# streaming gives the same text as a single response
prompt = "Once upon a time, there was a"
full = llm.create_completion(prompt, max_tokens=32, temperature=0)["choices"][0]["text"]
chunks = [
    c["choices"][0]["text"] for c in llm.create_completion(prompt, max_tokens=32, temperature=0, stream=True)
]
results["stream"] = "".join(chunks)
results["stream_equals_full"] = "".join(chunks) == full

# seeded sampling
out = llm.create_completion(
    "My favourite animal is", max_tokens=16, temperature=0.8, top_k=40, top_p=0.95, seed=42
)
results["seeded"] = out["choices"][0]["text"]

# logprobs
out = llm.create_completion("The sky is", max_tokens=4, temperature=0, logprobs=3)
results["logprobs_tokens"] = out["choices"][0]["logprobs"]["tokens"]
results["logprobs_values"] = [float(x) for x in out["choices"][0]["logprobs"]["token_logprobs"]]

# grammar
grammar = LlamaGrammar.from_string('root ::= ("yes" | "no") "."', verbose=False)
out = llm.create_completion("Is water wet? Answer:", max_tokens=8, temperature=0, grammar=grammar)
results["grammar"] = out["choices"][0]["text"]

# tokenize / detokenize (bytes)
tokens = llm.tokenize("Hello, world! 你好".encode())
results["tokens"] = tokens
results["detokenized"] = llm.detokenize(tokens[1:]).decode("utf-8")
results["n_vocab"] = llm.n_vocab()
results["n_ctx"] = llm.n_ctx()

# save / load state
llm.reset()
llm.eval(llm.tokenize(b"The three primary colors are"))
state = llm.save_state()
llm.create_completion("Something else entirely", max_tokens=4, temperature=0)
llm.load_state(state)
out = llm.create_completion("The three primary colors are", max_tokens=16, temperature=0)
results["after_state_load"] = out["choices"][0]["text"]

# chat (the default model has no template: llama-cpp-python's "llama-2" fallback)
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name a fruit that is yellow."},
]
out = llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0)
results["chat"] = out["choices"][0]["message"]
results["chat_finish"] = out["choices"][0]["finish_reason"]
results["chat_object"] = out["object"]
deltas = [
    c["choices"][0]["delta"]
    for c in llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0, stream=True)
]
results["chat_stream_deltas"] = deltas

# embeddings
embedder = Llama(model_path=MODEL, n_ctx=512, n_threads=2, embedding=True, pooling_type=1, verbose=False)
vectors = embedder.embed(["The cat sat on the mat.", "Quantum physics"])
results["embedding_dims"] = [len(v) for v in vectors]
results["embedding_head"] = [round(float(x), 3) for x in vectors[0][:8]]
response = embedder.create_embedding("hello")
results["embedding_object"] = response["object"]

results["seconds"] = time.perf_counter() - started
print(json.dumps(results))
