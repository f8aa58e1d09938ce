"""The few low-level names of llama-cpp-python that integrations call, over our native model.

llama-cpp-python binds all of ``llama.h`` function by function through ctypes, in its module
``llama_cpp.llama_cpp``, and re-exports every name from the package. Some libraries reach
past its high-level API for one or two of them. This module provides exactly those, with
llama.h's signatures and return conventions, implemented over :class:`llama_cpp.Llama`'s
native model: it is not a ctypes copy of ``llama.h``, and it grows only when an integration
needs another name.

=========================  ===============================================================
name                       used by
=========================  ===============================================================
``llama_model_get_vocab``  outlines (``LlamaCppTokenizer``: ``llama_model_get_vocab(llm.model)``)
``llama_token_to_piece``   outlines (the text of every token, into a ``ctypes`` buffer)
=========================  ===============================================================

Both are importable from ``llama_cpp`` too, as with llama-cpp-python. ``llm.model`` is the
native model (llama-cpp-python's is a ctypes pointer); pass it as it is.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llama_cpp import _core
from llama_cpp.errors import InvalidArgumentError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["LlamaVocab", "llama_model_get_vocab", "llama_token_to_piece"]


@dataclass(frozen=True, slots=True)
class LlamaVocab:
    """A model's vocabulary, as ``llama_model_get_vocab`` returns it (llama.h's ``llama_vocab *``).

    It keeps the model alive; once the model is closed, using it raises :class:`ClosedError`.

    Attributes:
        model: The native model (``Llama.model``).
    """

    model: _core.Model


def llama_model_get_vocab(model: _core.Model, /) -> LlamaVocab:
    """The vocabulary of ``model`` (``Llama.model``), for :func:`llama_token_to_piece`.

    Raises:
        InvalidArgumentError: ``model`` is not a native model.
    """
    if not isinstance(model, _core.Model):
        raise InvalidArgumentError(
            f"llama_model_get_vocab expects Llama.model (a native model), got {type(model).__name__}"
        )
    return LlamaVocab(model)


def llama_token_to_piece(  # noqa: PLR0917 - llama.h's signature, positional as in llama-cpp-python
    vocab: LlamaVocab,
    token: int,
    buf: WriteableBuffer,
    length: int,
    lstrip: int,
    special: bool,
    /,
) -> int:
    """Write the text of ``token`` into ``buf``, as llama.h's function of the same name.

    No NUL terminator is written. As in llama.h, a piece longer than ``length`` is not
    written at all: the result is then minus the size it needs.

    Args:
        vocab: From :func:`llama_model_get_vocab`.
        token: A token id.
        buf: A writable buffer of at least ``length`` bytes (``(ctypes.c_char * n)()``,
            a ``bytearray``, ...).
        length: How many bytes of ``buf`` may be written.
        lstrip: Skip up to this many leading spaces of the piece.
        special: Render control tokens (``<eos>``, ...) as their text; otherwise they are empty.

    Returns:
        The number of bytes written, or ``-size`` when the piece needs ``size`` > ``length``.

    Raises:
        InvalidArgumentError: ``vocab`` is not a vocabulary, ``token`` is out of range, or
            ``buf`` is not a writable buffer of ``length`` bytes.
        ClosedError: The model was closed.
    """
    if not isinstance(vocab, LlamaVocab):
        raise InvalidArgumentError(
            "llama_token_to_piece expects a vocabulary from llama_model_get_vocab, "
            f"got {type(vocab).__name__}"
        )
    piece = vocab.model.token_to_piece(int(token), bool(special))
    skip = 0
    while skip < lstrip and skip < len(piece) and piece[skip] == ord(" "):
        skip += 1
    piece = piece[skip:]
    if len(piece) > length:
        return -len(piece)
    try:
        # A ctypes view of the caller's memory: ctypes arrays and bytearrays alike.
        target = (ctypes.c_char * max(length, 0)).from_buffer(buf)
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(
            f"llama_token_to_piece needs a writable buffer of {length} bytes, got {type(buf).__name__}"
        ) from error
    ctypes.memmove(target, piece, len(piece))
    return len(piece)
