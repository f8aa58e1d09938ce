"""The server for a test module: ``create_app`` on a real uvicorn bound to a port of 127.0.0.1
that the kernel picks, and a client holding ``httpx`` and the official ``openai`` client."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from llama_cpp.server import ServerSettings, create_app

KEY = "test-key"


class Server:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        self.openai = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by ``name{label=value,...}``."""
        text = self.http.get("/metrics").text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
        return out

    def wait_for(self, condition: Callable[[dict[str, float]], bool], what: str) -> None:
        """Poll /metrics until ``condition`` holds (bounded: 10 s)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if condition(self.metrics()):
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}: {self.metrics()}")


@contextlib.contextmanager
def serve(settings: ServerSettings) -> Iterator[Server]:
    """Run ``create_app(settings)`` until the block ends; yields once ``/health`` is 200 (the
    default model loaded), having seen only 503 ``{"status": "loading"}`` before."""
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the kernel picks the port; nothing else can take it
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="uvicorn")
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"{url}/health", timeout=5)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.02)
                continue
            if status.status_code == 200:
                break
            assert status.status_code == 503
            assert status.json() == {"status": "loading"}
            time.sleep(0.02)
        assert status is not None
        assert status.status_code == 200, status.text
        client = Server(url)
        yield client
        client.http.close()
        client.openai.close()
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive()


def events(lines: Iterator[str], *, done: bool = True) -> Iterator[dict[str, Any]]:
    """The JSON events of an SSE answer, checking its framing: a final ``data: [DONE]`` if
    ``done`` (OpenAI's routes), none otherwise (llama-server's own)."""
    seen_done = False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        if line == "data: [DONE]":
            assert done, "a [DONE] where none is sent"
            seen_done = True
            continue
        assert not seen_done, "an event after [DONE]"
        yield json.loads(line[6:])
    assert seen_done == done, "no data: [DONE]"


#: A forced tool call, as the server tests ask for it.
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
WEATHER: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
CHOICE: Any = {"type": "function", "function": {"name": "get_weather"}}
