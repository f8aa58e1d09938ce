"""Helpers for testing code that uses llama_cpp: tiny GGUF models written on the spot.

Needs the optional ``gguf`` and ``numpy`` packages (``pip install llama-cpp-nanobind[test]``).
"""

from llama_cpp.testing.tiny_models import (
    BOS_ID,
    EOS_ID,
    EOT_ID,
    SPACE_ID,
    TinyModelSpec,
    byte_token,
    write_tiny_llama,
    write_tiny_lora,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "EOT_ID",
    "SPACE_ID",
    "TinyModelSpec",
    "byte_token",
    "write_tiny_llama",
    "write_tiny_lora",
]
