"""Helpers for testing code that uses llama_cpp: tiny GGUF models written on the spot.

Needs the optional ``gguf`` package (``pip install llama-cpp-nanobind[test]``).
"""

from llama_cpp.testing.tiny_models import (
    BOS_ID,
    EOS_ID,
    EOT_ID,
    FIM_MID_ID,
    FIM_PRE_ID,
    FIM_REP_ID,
    FIM_SEP_ID,
    FIM_SUF_ID,
    SEP_ID,
    SPACE_ID,
    TinyModelSpec,
    TinyRerankerSpec,
    byte_token,
    tiny_reranker_scores,
    write_tiny_llama,
    write_tiny_lora,
    write_tiny_reranker,
)
from llama_cpp.testing.tiny_moe import TinyMoeSpec, tiny_moe_experts, write_tiny_moe

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "EOT_ID",
    "FIM_MID_ID",
    "FIM_PRE_ID",
    "FIM_REP_ID",
    "FIM_SEP_ID",
    "FIM_SUF_ID",
    "SEP_ID",
    "SPACE_ID",
    "TinyModelSpec",
    "TinyMoeSpec",
    "TinyRerankerSpec",
    "byte_token",
    "tiny_moe_experts",
    "tiny_reranker_scores",
    "write_tiny_llama",
    "write_tiny_lora",
    "write_tiny_moe",
    "write_tiny_reranker",
]
