"""Snapshots of a context: :class:`LlamaState`, made by :meth:`Llama.save_state`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LlamaState:
    """The KV cache and last logits of a context, with the tokens they hold.

    ``data`` is llama.cpp's own serialization, kept as one ``bytes`` object (no per-token
    Python objects). A state loads into a context of the same model whose window can hold
    its tokens.

    Attributes:
        model_path: The model the state was taken from.
        n_ctx: The context window it was taken from.
        tokens: The tokens in the KV cache.
        data: llama.cpp's serialized state.
    """

    model_path: str
    n_ctx: int
    tokens: tuple[int, ...]
    data: bytes

    # llama-cpp-python's LlamaState attribute names, for code that reads them.
    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def input_ids(self) -> list[int]:
        return list(self.tokens)

    @property
    def llama_state(self) -> bytes:
        return self.data

    @property
    def llama_state_size(self) -> int:
        return len(self.data)
