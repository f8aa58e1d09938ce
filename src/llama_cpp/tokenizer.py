"""llama-cpp-python's ``LlamaTokenizer``: the model's own tokenizer behind a small object.

Libraries written for llama-cpp-python get it from ``Llama.tokenizer()`` (outlines builds its
vocabulary and decodes with it). It holds the :class:`~llama_cpp.Llama` it came from and
calls its :meth:`~llama_cpp.Llama.tokenize` / :meth:`~llama_cpp.Llama.detokenize`; closing the
``Llama`` closes it too (its calls then raise :class:`ClosedError`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from llama_cpp.errors import InvalidArgumentError

if TYPE_CHECKING:
    from llama_cpp.llama import Llama

__all__ = ["LlamaTokenizer"]


class LlamaTokenizer:
    """Tokenize and detokenize with a model's vocabulary (llama-cpp-python's class).

    Unlike :meth:`Llama.tokenize`, whose ``special`` defaults to False, :meth:`tokenize` and
    :meth:`encode` parse special-token text by default, as llama-cpp-python's do.

    Args:
        llama: The model whose vocabulary to use.
    """

    def __init__(self, llama: Llama) -> None:
        self._llama = llama

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        """The token ids of the UTF-8 ``text``.

        Args:
            text: UTF-8 bytes.
            add_bos: Add the BOS (and EOS) tokens the model asks for.
            special: Parse special-token text such as ``<start_of_turn>`` as special tokens.

        Raises:
            InvalidArgumentError: ``text`` is not bytes.
        """
        if not isinstance(text, bytes | bytearray | memoryview):
            raise InvalidArgumentError(f"tokenize expects UTF-8 bytes, got {type(text).__name__}")
        return self._llama.tokenize(bytes(text), add_bos=add_bos, special=special)

    def detokenize(
        self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None, special: bool = False
    ) -> bytes:
        """The bytes of ``tokens`` (which may end inside a multi-byte character).

        Args:
            tokens: Token ids.
            prev_tokens: Accepted for llama-cpp-python's signature; as there, it changes nothing.
            special: Render control tokens (``<eos>``, ...) as their text.

        Raises:
            InvalidArgumentError: A token id is out of the vocabulary's range.
        """
        return self._llama.detokenize(tokens, special=special)

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """:meth:`tokenize` for ``str`` (characters that cannot be encoded are dropped)."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"encode expects str, got {type(text).__name__}")
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``; bytes that are not valid UTF-8 are dropped."""
        return self.detokenize(tokens).decode("utf-8", errors="ignore")

    @classmethod
    def from_ggml_file(cls, path: str | os.PathLike[str]) -> LlamaTokenizer:
        """A tokenizer over the vocabulary of the GGUF file at ``path`` (loaded ``vocab_only``).

        Raises:
            ModelLoadError: The file is missing or not a GGUF model.
        """
        from llama_cpp.llama import Llama  # llama imports this module

        return cls(Llama(path, vocab_only=True, verbose=False))
