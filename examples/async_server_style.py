"""What a web backend does: stream tokens asynchronously, and cancel a request mid-way.

Run from the repository root after `make demo`: python examples/async_server_style.py
"""

import asyncio

from llama_cpp import Llama


async def main() -> None:
    with Llama("models/gemma-3-270m-q4_k_m.gguf", n_ctx=1024) as llm:
        stream = await llm.create_completion_async(
            "The three laws of robotics are", max_tokens=48, stream=True
        )
        async for chunk in stream:
            print(chunk["choices"][0]["text"], end="", flush=True)
        print()

        # A client that goes away: cancelling the task stops the C++ token loop at once.
        task = asyncio.create_task(llm.generate_async("Count from one to a thousand:", max_tokens=2000))
        await asyncio.sleep(0.5)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            print("cancelled; the model is free again:", await llm.generate_async("Hello", max_tokens=8))


asyncio.run(main())
