"""Fill-in-the-middle: the infill prompt of ``create_completion(prompt, suffix=...)``.

A code model trained for infilling (Code Llama, CodeGemma, StarCoder, Qwen2.5-Coder, ...) has
three control tokens, FIM_PRE, FIM_SUF and FIM_MID, which llama.cpp reads from the GGUF
(``tokenizer.ggml.fim_*_token_id``, or guessed from their text). Given the text before the
gap (``prompt``) and after it (``suffix``), the model writes the middle after::

    [BOS] FIM_PRE prompt FIM_SUF suffix FIM_MID

That is llama-cpp-python's order (its ``spm_infill=False``) and llama-server's ``/infill``
(``format_prompt_infill``). :func:`repo_infill_prompt` adds what that endpoint puts ahead of
it, the repository-level context (the ``input_extra`` chunks).
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_cpp import _core
from llama_cpp.errors import InvalidArgumentError

__all__ = ["fim_prompt", "infill_request", "repo_context", "repo_infill_prompt"]

# Code Llama's encode_infilling (which llama-cpp-python copies): the suffix is tokenized
# behind a throwaway character, whose tokens are then dropped, so that a SentencePiece
# tokenizer's space prefix lands on that character and not on the suffix.
_MARKER = "☺"


def _text_tokens(model: _core.Model, text: str | bytes) -> list[int]:
    # Special-token text stays text, as in llama-cpp-python and llama-server: the FIM tokens
    # are the only control tokens of the prompt.
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return model.tokenize(data, False, False)


def _adds_space_prefix(model: _core.Model) -> bool:
    # The effective add_space_prefix (llama.cpp's default for the vocabulary type, or the
    # GGUF's tokenizer.ggml.add_space_prefix), read from the tokenizer's output.
    first = _text_tokens(model, "a")[:1]
    return bool(first) and model.token_to_piece(first[0], False).startswith(b" ")


def _suffix_tokens(model: _core.Model, suffix: str | bytes) -> list[int]:
    if not suffix or not _adds_space_prefix(model):
        return _text_tokens(model, suffix)
    text = suffix.encode("utf-8") if isinstance(suffix, str) else bytes(suffix)
    marker = _text_tokens(model, _MARKER)
    tokens = _text_tokens(model, _MARKER.encode("utf-8") + text)
    if tokens[: len(marker)] != marker:
        # The marker merged with the suffix's first characters: keep the space rather than
        # drop part of the suffix.
        return _text_tokens(model, text)
    return tokens[len(marker) :]


def fim_prompt(
    model: _core.Model,
    prompt: str | bytes | Sequence[int],
    suffix: str | bytes | Sequence[int],
) -> list[int]:
    """The fill-in-the-middle prompt: ``[BOS] FIM_PRE prompt FIM_SUF suffix FIM_MID``.

    Text is tokenized without BOS and with special-token text kept as text; where the
    tokenizer prepends a space (SentencePiece's ``add_space_prefix``) the prompt keeps it and
    the suffix does not, as in Code Llama's and llama-cpp-python's infill prompt. No EOS is
    appended even where the model asks for one (the model must go on after FIM_MID), as in
    llama-server's ``/infill``.

    Args:
        model: The model; it must have the FIM_PRE, FIM_SUF and FIM_MID tokens.
        prompt: The text before the gap (UTF-8 bytes or str), or its token ids (used as they
            are).
        suffix: The text after the gap, or its token ids (used as they are).

    Returns:
        The token ids: BOS where the model adds one, then FIM_PRE, the prompt's tokens,
        FIM_SUF, the suffix's tokens and FIM_MID.

    Raises:
        InvalidArgumentError: The model lacks one of the three FIM tokens.
        ClosedError: The model is closed.
    """
    special = {"FIM_PRE": model.token_fim_pre, "FIM_SUF": model.token_fim_suf, "FIM_MID": model.token_fim_mid}
    missing = [name for name, token in special.items() if token < 0]
    if missing:
        raise InvalidArgumentError(
            f"suffix (fill-in-the-middle) needs a model with FIM tokens; this model has no "
            f"{', '.join(missing)} token (tokenizer.ggml.fim_*_token_id)"
        )
    prefix = _text_tokens(model, prompt) if isinstance(prompt, str | bytes) else list(prompt)
    middle = _suffix_tokens(model, suffix) if isinstance(suffix, str | bytes) else list(suffix)
    bos = [model.token_bos] if model.add_bos and model.token_bos >= 0 else []
    return [*bos, special["FIM_PRE"], *prefix, special["FIM_SUF"], *middle, special["FIM_MID"]]


#: llama-server's separator ahead of each repository chunk of a model without FIM_SEP.
_SNIPPET = "\n\n--- snippet ---\n\n"


def repo_context(model: _core.Model, chunks: Sequence[tuple[str, str]]) -> list[int]:
    """llama-server's repository-level context of ``/infill`` (its ``format_prompt_infill``,
    after Qwen2.5-Coder's pattern, arXiv:2409.12186), as tokens::

        [FIM_REP "myproject\n"]
        (FIM_SEP filename "\n" text | "\n\n--- snippet ---\n\n" text)...
        [FIM_SEP "filename\n"]

    FIM_REP and its project line where the model has that token; each ``(filename, text)``
    chunk behind FIM_SEP and its file name, or, for a model without FIM_SEP, behind a
    ``--- snippet ---`` line; then FIM_SEP and a file name for the file being edited, where
    the model has FIM_SEP. The names are llama-server's placeholders, as it sends them.
    """
    rep, sep = model.token_fim_rep, model.token_fim_sep
    tokens: list[int] = [rep, *_text_tokens(model, "myproject\n")] if rep >= 0 else []
    for filename, text in chunks:
        if sep >= 0:
            tokens += [sep, *_text_tokens(model, filename + "\n")]
        else:
            tokens += _text_tokens(model, _SNIPPET)
        tokens += _text_tokens(model, text)
    if sep >= 0:
        tokens += [sep, *_text_tokens(model, "filename\n")]
    return tokens


def repo_infill_prompt(
    model: _core.Model,
    prefix: str,
    suffix: str,
    prompt: str,
    chunks: Sequence[tuple[str, str]],
    *,
    n_ctx: int,
    n_batch: int,
    n_predict: int,
) -> list[int]:
    """llama-server's ``/infill`` prompt (its ``format_prompt_infill``)::

        repository context  [BOS] FIM_PRE prefix prompt FIM_SUF suffix FIM_MID

    cut as llama-server cuts it to fit a window of ``n_ctx`` tokens: the prefix keeps its
    last ``3 * (n_batch // 4)`` tokens, the suffix its first ``n_batch // 4 - 2 - len(prompt)``,
    and the context (:func:`repo_context`) its last ``n_ctx - n_batch - 2 * n_predict``; here,
    also no more than leaves room for ``n_predict`` tokens (at least one) after the prompt.
    ``prompt`` (the text that continues the prefix) is tokenized on its own, as there.

    Raises:
        InvalidArgumentError: The model lacks one of FIM_PRE, FIM_SUF and FIM_MID.
    """
    tokens_prefix = _text_tokens(model, prefix)
    tokens_prompt = _text_tokens(model, prompt)
    tokens_suffix = _suffix_tokens(model, suffix)
    quarter = n_batch // 4
    prefix_take = min(len(tokens_prefix), 3 * quarter)
    suffix_take = min(len(tokens_suffix), max(0, quarter - (2 + len(tokens_prompt))))
    core = fim_prompt(
        model, tokens_prefix[len(tokens_prefix) - prefix_take :] + tokens_prompt, tokens_suffix[:suffix_take]
    )
    extra = repo_context(model, chunks)
    take = max(0, min(len(extra), n_ctx - n_batch - 2 * n_predict, n_ctx - len(core) - max(n_predict, 1)))
    return extra[len(extra) - take :] + core


def infill_request(
    model: _core.Model,
    prompt: str | bytes | Sequence[int],
    suffix: str | bytes | Sequence[int],
    *,
    echo: bool,
    logprobs: int | None,
) -> tuple[list[int], str]:
    """The prompt tokens of a completion with ``suffix`` and the text that ``echo`` returns.

    As in llama-cpp-python, ``echo`` returns the prompt (the text before the gap) followed by
    the generated middle; the suffix and the FIM tokens are not echoed.

    Returns:
        :func:`fim_prompt`'s tokens, and the prompt's text if ``echo`` is set (else "").

    Raises:
        InvalidArgumentError: The model lacks FIM tokens, or ``echo`` is combined with
            ``logprobs``: the scored prompt (FIM tokens, prompt and suffix) is not the echoed
            text, so its logprobs would not line up with it.
    """
    if echo and logprobs is not None:
        raise InvalidArgumentError(
            "echo with logprobs cannot be combined with suffix: the scored infill prompt "
            "(prompt, suffix and FIM tokens) is not the echoed text"
        )
    tokens = fim_prompt(model, prompt, suffix)
    if not echo:
        return tokens, ""
    if isinstance(prompt, str):
        return tokens, prompt
    data = bytes(prompt) if isinstance(prompt, bytes) else model.detokenize(list(prompt), False)
    return tokens, data.decode("utf-8", errors="replace")
