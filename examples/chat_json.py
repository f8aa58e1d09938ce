"""Chat with a JSON-schema response format: the answer always parses and validates.

Run from the repository root after `make demo`: python examples/chat_json.py
"""

import json

from llama_cpp import Llama

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
    },
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}

with Llama("models/gemma-3-270m-q4_k_m.gguf", n_ctx=1024) as llm:
    response = llm.create_chat_completion(
        [{"role": "user", "content": "Give me a large European city as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
        max_tokens=120,
        seed=1,
    )
    city = json.loads(response["choices"][0]["message"]["content"] or "")
    print(json.dumps(city, indent=2, ensure_ascii=False))
