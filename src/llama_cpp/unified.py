"""`UnifiedLLM`: one API over model families, with each family's quirks applied for you.

The family comes from the GGUF's metadata (:func:`llama_cpp.families.detect_family`), never
from its file name. It decides what ``thinking=`` means for the model (an ``enable_thinking``
switch, a GPT-OSS reasoning effort, or nothing), the sampling used where the caller sets
none (the model card's), the context window opened by default, and a chat template for
files converted without one. Reasoning comes back apart from the answer, parsed by
llama.cpp's chat format for the model (``reasoning_content``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, Self, overload

from llama_cpp.config import LlamaConfig, resolve_config
from llama_cpp.errors import ClosedError, InvalidArgumentError
from llama_cpp.families import ARCHITECTURE_KEY, TEMPLATE_KEY, ModelFamily, Thinking, detect_family
from llama_cpp.llama import Llama
from llama_cpp.llama_types import ChatCompletionChunk, CreateChatCompletionResponse

__all__ = ["UnifiedLLM", "family_settings"]

Message = Mapping[str, Any]
# Template variables that ``thinking=`` sets; passing one besides it is ambiguous.
_THINKING_VARIABLES = ("enable_thinking", "reasoning_effort")


def family_settings(
    model_path: str | os.PathLike[str],
    config: LlamaConfig,
    *,
    family: ModelFamily | None = None,
    cap_context: bool = False,
) -> tuple[ModelFamily, LlamaConfig]:
    """The model's family (from its GGUF metadata, read with a vocabulary-only load) and
    ``config`` with what the family implies where ``config`` leaves it open: the family's chat
    template for a GGUF without one (unless ``config`` names a template or a format), and with
    ``cap_context`` the family's context cap (or the trained context, if smaller) as ``n_ctx``.
    :class:`UnifiedLLM` and the server load models through it.

    Raises:
        ModelLoadError: The file is missing or not a loadable GGUF model.
    """
    with Llama(model_path, vocab_only=True, verbose=False) as probe:
        metadata = probe.metadata
    chosen = family or detect_family(metadata, config.chat_template)
    implied: dict[str, Any] = {}
    if cap_context:
        trained = int(metadata.get(f"{metadata.get(ARCHITECTURE_KEY, '')}.context_length", "0") or 0)
        implied["n_ctx"] = min(chosen.context_cap, trained) if trained > 0 else chosen.context_cap
    has_template = bool(metadata.get(TEMPLATE_KEY)) or config.chat_template is not None
    if not has_template and chosen.fallback_template and config.chat_format is None:
        implied["chat_template"] = chosen.fallback_template
    return chosen, replace(config, **implied)


class UnifiedLLM:
    """A :class:`~llama_cpp.Llama` that knows its model family.

    Opening a file reads its metadata first (a vocabulary-only load) to find the family,
    then loads the model with ``config`` and ``options``, adding what the family implies
    where they leave it open: ``n_ctx`` (the family's cap, or the model's training context if
    smaller) and ``chat_template`` (the family's, for a GGUF without one and no
    ``chat_template`` / ``chat_format`` of the caller's). Close it (or use it as a context
    manager) to free the model.

    Args:
        model_path: Path to a GGUF file.
        family: Force a family (e.g. ``families.family_named("qwen3")``) instead of detecting it.
        config: :class:`~llama_cpp.Llama`'s settings as a :class:`LlamaConfig`.
        **options: :class:`~llama_cpp.Llama`'s keyword arguments (set over ``config``).

    Raises:
        TypeError: An unknown keyword argument.
        ModelLoadError: The file is missing or not a loadable GGUF model.
        InvalidArgumentError: An argument is out of range.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        family: ModelFamily | None = None,
        config: LlamaConfig | None = None,
        **options: Any,
    ) -> None:
        settings = resolve_config("UnifiedLLM", config, options)
        chosen, settings = family_settings(
            model_path, settings, family=family, cap_context="n_ctx" not in options and config is None
        )
        self._llm: Llama | None = Llama(model_path, config=settings)
        self._family = chosen
        self._owns = True

    @classmethod
    def from_llama(cls, llm: Llama, *, family: ModelFamily | None = None) -> UnifiedLLM:
        """Wrap an open :class:`~llama_cpp.Llama`, which stays the caller's: :meth:`close`
        leaves it open. Its context window and chat template are used as they are.

        Args:
            llm: The model.
            family: Force a family instead of detecting it from ``llm.metadata``.
        """
        self = cls.__new__(cls)
        self._llm = llm
        self._family = family or detect_family(llm.metadata, llm.config.chat_template)
        self._owns = False
        return self

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the model (unless it was wrapped with :meth:`from_llama`). Idempotent."""
        if self._llm is not None and self._owns:
            self._llm.close()
        self._llm = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        path = self._llm.model_path if self._llm is not None else "closed"
        return f"UnifiedLLM({path!r}, family={self._family.name!r})"

    # -- facts ----------------------------------------------------------------------------

    @property
    def family(self) -> ModelFamily:
        """The model's family (:data:`llama_cpp.families.GENERIC` when unknown)."""
        return self._family

    @property
    def llama(self) -> Llama:
        """The underlying model.

        Raises:
            ClosedError: After :meth:`close`.
        """
        if self._llm is None:
            raise ClosedError("this UnifiedLLM is closed")
        return self._llm

    def chat_kwargs(self, thinking: Thinking = None, **kwargs: Any) -> dict[str, Any]:
        """The ``create_chat_completion`` keyword arguments for a request: ``kwargs`` with the
        template variables that ask for ``thinking`` added to ``chat_template_kwargs``, and
        the family's recommended sampling for each setting that ``kwargs`` leaves out.

        Raises:
            InvalidArgumentError: The family cannot honour ``thinking`` (see
                :meth:`ModelFamily.template_kwargs`), the model's template has no thinking
                switch, or ``thinking`` is given together with ``enable_thinking`` /
                ``reasoning_effort``.
        """
        variables = dict(kwargs.pop("chat_template_kwargs", None) or {})
        if kwargs.get("reasoning_effort") is not None:
            variables["reasoning_effort"] = kwargs.pop("reasoning_effort")
        if thinking is not None:
            clash = [name for name in _THINKING_VARIABLES if name in variables]
            if clash:
                raise InvalidArgumentError(f"pass thinking or {clash[0]}, not both")
        implied = self._family.template_kwargs(thinking)
        if implied.get("enable_thinking") is True and not self.llama.chat_templates().supports_thinking():
            raise InvalidArgumentError(
                f"this {self._family.name} model's chat template has no enable_thinking switch; "
                "thinking=True is not available"
            )
        effective = thinking if thinking is not None else variables.get("enable_thinking")
        variables.update(implied)
        prepared = {**self._family.recommended_sampling(effective).as_kwargs(), **kwargs}
        if variables:
            prepared["chat_template_kwargs"] = variables
        return prepared

    # -- chat -----------------------------------------------------------------------------

    @overload
    def create_chat_completion(
        self,
        messages: Sequence[Message],
        *,
        thinking: Thinking = None,
        stream: Literal[False] = False,
        **kwargs: Any,
    ) -> CreateChatCompletionResponse: ...

    @overload
    def create_chat_completion(
        self, messages: Sequence[Message], *, thinking: Thinking = None, stream: Literal[True], **kwargs: Any
    ) -> Iterator[ChatCompletionChunk]: ...

    def create_chat_completion(
        self, messages: Sequence[Message], *, thinking: Thinking = None, stream: bool = False, **kwargs: Any
    ) -> CreateChatCompletionResponse | Iterator[ChatCompletionChunk]:
        """:meth:`Llama.create_chat_completion` with the family's quirks applied.

        The message's ``reasoning_content`` holds the model's reasoning, ``content`` the
        answer (with ``stream=True``: deltas with those keys).

        Args:
            messages: OpenAI chat messages.
            thinking: None: the model's default. True / False: reason or not (hybrid
                families switch ``enable_thinking``; GPT-OSS: effort medium / low).
                ``"low"``, ``"medium"``, ``"high"``: GPT-OSS's reasoning effort.
            stream: Yield ``chat.completion.chunk`` dicts.
            **kwargs: :meth:`Llama.create_chat_completion`'s; sampling settings left out
                take the family's recommended values.

        Raises:
            InvalidArgumentError: See :meth:`chat_kwargs`, and malformed messages or tools.
        """
        prepared = self.chat_kwargs(thinking, **kwargs)
        if stream:
            return self.llama.create_chat_completion(messages, stream=True, **prepared)
        return self.llama.create_chat_completion(messages, stream=False, **prepared)

    async def create_chat_completion_async(
        self, messages: Sequence[Message], *, thinking: Thinking = None, stream: bool = False, **kwargs: Any
    ) -> CreateChatCompletionResponse | AsyncIterator[ChatCompletionChunk]:
        """:meth:`create_chat_completion` off the event loop (with ``stream=True``: an
        async iterator of chunks; cancelling stops the generation)."""
        prepared = self.chat_kwargs(thinking, **kwargs)
        if stream:
            return await self.llama.create_chat_completion_async(messages, stream=True, **prepared)
        return await self.llama.create_chat_completion_async(messages, stream=False, **prepared)

    # -- one prompt -----------------------------------------------------------------------

    def chat_with_thinking(
        self,
        prompt: str,
        *,
        thinking: Thinking = None,
        system: str | None = None,
        max_tokens: int | None = None,
        **kwargs: Any,
    ) -> tuple[str, str]:
        """Answer one user message; return the reasoning and the answer apart.

        Args:
            prompt: The user's message.
            thinking: As for :meth:`create_chat_completion`.
            system: A system message to put first.
            max_tokens: Most tokens to generate, reasoning included (None: until the end of
                the turn or of the context window).
            **kwargs: Sampling and other :meth:`Llama.create_chat_completion` arguments.

        Returns:
            ``(thinking, answer)``; ``thinking`` is ``""`` when the model did not reason.

        Raises:
            InvalidArgumentError: See :meth:`chat_kwargs`.
        """
        response = self.create_chat_completion(
            _messages(prompt, system), thinking=thinking, max_tokens=max_tokens, **kwargs
        )
        return _split(response)

    def chat(
        self,
        prompt: str,
        *,
        thinking: Thinking = None,
        system: str | None = None,
        max_tokens: int | None = None,
        **kwargs: Any,
    ) -> str:
        """Answer one user message: the answer only, without any reasoning.

        Arguments and errors as for :meth:`chat_with_thinking`.
        """
        return self.chat_with_thinking(
            prompt, thinking=thinking, system=system, max_tokens=max_tokens, **kwargs
        )[1]

    async def chat_with_thinking_async(
        self,
        prompt: str,
        *,
        thinking: Thinking = None,
        system: str | None = None,
        max_tokens: int | None = None,
        **kwargs: Any,
    ) -> tuple[str, str]:
        """:meth:`chat_with_thinking` off the event loop (cancelling stops it)."""
        response = await self.create_chat_completion_async(
            _messages(prompt, system), thinking=thinking, max_tokens=max_tokens, **kwargs
        )
        assert isinstance(response, dict), "stream=True is not for chat_with_thinking_async"
        return _split(response)

    async def chat_async(
        self,
        prompt: str,
        *,
        thinking: Thinking = None,
        system: str | None = None,
        max_tokens: int | None = None,
        **kwargs: Any,
    ) -> str:
        """:meth:`chat` off the event loop (cancelling stops it)."""
        pair = await self.chat_with_thinking_async(
            prompt, thinking=thinking, system=system, max_tokens=max_tokens, **kwargs
        )
        return pair[1]


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": prompt}]


def _split(response: CreateChatCompletionResponse) -> tuple[str, str]:
    message = response["choices"][0]["message"]
    return message.get("reasoning_content") or "", message.get("content") or ""
