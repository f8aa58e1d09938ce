"""``llama-cpp serve``: an OpenAI-compatible HTTP server on :class:`~llama_cpp.LlamaPool`.

``create_app(settings)`` returns the server as a FastAPI app (no module globals: run it with
uvicorn, or mount it in your own ASGI app); ``load_settings`` reads its settings from a config
file, the environment and flags. Needs the ``server`` extra (fastapi, uvicorn,
prometheus-client).
"""

from llama_cpp.server.app import chat_call, count_tokens, create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings, SettingsError, load_settings

__all__ = [
    "ModelSettings",
    "ServerSettings",
    "SettingsError",
    "chat_call",
    "count_tokens",
    "create_app",
    "load_settings",
]
