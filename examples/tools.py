"""Tool calls: the model asks for a function, we run it and hand back its result.

The default model's GGUF has no chat template, so its tools use the generic JSON format,
constrained by a grammar: a forced call (tool_choice="required" or a named function) always
parses. Models whose template describes tools (Qwen3, Llama 3.x, Mistral, GPT-OSS, ...) use
their own format, parsed by llama.cpp's per-family parsers; the dicts are the same.

Run from the repository root after `make demo`: python examples/tools.py
"""

import json

from llama_cpp import Llama

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
        },
    },
}


def get_weather(city: str) -> dict[str, object]:
    return {"city": city, "temperature_c": 21, "sky": "clear"}


with Llama("models/gemma-3-270m-q4_k_m.gguf", n_ctx=2048) as llm:
    messages: list[dict[str, object]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = llm.create_chat_completion(messages, tools=[WEATHER], tool_choice="required", max_tokens=64)
    call = first["choices"][0]["message"]["tool_calls"][0]
    arguments = json.loads(call["function"]["arguments"])
    print("the model called", call["function"]["name"], arguments)
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    messages.append(
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(get_weather(**arguments))}
    )
    answer = llm.create_chat_completion(messages, tools=[WEATHER], tool_choice="none", max_tokens=48)
    print("answer:", answer["choices"][0]["message"]["content"])
