"""``llama-cpp serve``: an OpenAI- and Anthropic-compatible HTTP server on :class:`LlamaPool`.

Being built (issue 11): ``create_app(settings)`` (app.py), the OpenAI routes, the Anthropic
Messages and OpenAI Responses translators (anthropic.py, responses.py, over
:data:`~llama_cpp.server.chat_call.ChatCall`), metrics, the CLI.
"""
