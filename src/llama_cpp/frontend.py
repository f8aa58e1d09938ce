"""What :class:`~llama_cpp.Llama` and :class:`~llama_cpp.LlamaPool` share: the request API.

Both are front ends to the same request path: a :class:`~llama_cpp.request.RequestBuilder`
prepares each request and builds its answer, and the front end only decodes it (one
context, or a slot of the pool's engine). :class:`FrontEnd` writes that API once, in terms
of the two ways a front end decodes (:meth:`FrontEnd._stream`, :meth:`FrontEnd._generate`),
so the two classes have the same methods, keywords, defaults, errors and async twins by
construction. Everything else a front end has (the model, the context or the engine, LoRA,
embeddings) is composed into it, not inherited.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, overload

from llama_cpp import _async, _core
from llama_cpp._options import utf8
from llama_cpp.chat import RenderedChat, answer_grammar, openai_chunks
from llama_cpp.completion_output import GenerationStream, Outcome, collect
from llama_cpp.embeddings import EmbeddingInput
from llama_cpp.errors import InvalidArgumentError
from llama_cpp.json_schema import schema_to_grammar
from llama_cpp.llama_types import (
    ChatCompletionChunk,
    CreateChatCompletionResponse,
    CreateCompletionResponse,
    CreateEmbeddingResponse,
)
from llama_cpp.params import DEFAULT_SEED, SamplingParams
from llama_cpp.request import Prompt, Request, RequestBuilder
from llama_cpp.results import Completion

if TYPE_CHECKING:
    # The openai package is optional: only create_chat_completion_openai_v1 needs it.
    from openai.types.chat import ChatCompletion as OpenAIChatCompletion
    from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk

__all__ = ["FrontEnd", "text_pieces"]

Messages = Sequence[Mapping[str, Any]]


class FrontEnd(ABC):
    """The request API of a model: completions, chat, the native generation API, their async
    twins. A subclass provides :attr:`_requests` and the two ways it decodes a request."""

    #: Keywords of create_completion / create_chat_completion that the front end takes
    #: itself, not the request (the pool's ``lora``).
    _RUN_KEYWORDS: frozenset[str] = frozenset()
    _requests: RequestBuilder

    @abstractmethod
    def _stream(self, request: Request, run: Mapping[str, Any]) -> GenerationStream:
        """Start decoding ``request``; ``run`` holds the :attr:`_RUN_KEYWORDS` given."""

    def _generate(self, request: Request, run: Mapping[str, Any]) -> Outcome:
        """Decode ``request`` to its end."""
        return collect(self._stream(request, run))

    def _run_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {key: kwargs.pop(key) for key in self._RUN_KEYWORDS if key in kwargs}

    @property
    @abstractmethod
    def model(self) -> _core.Model:
        """The native model (raises ClosedError once closed)."""

    def n_vocab(self) -> int:
        return self.model.n_vocab

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF metadata, values rendered as text (arrays are summarised by llama.cpp)."""
        return dict(self.model.metadata())

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: UTF-8 bytes or str.
            add_bos: Add the BOS (and EOS) tokens the model asks for.
            special: Parse special-token text such as ``<start_of_turn>`` as special tokens.

        Raises:
            InvalidArgumentError: ``text`` is neither str nor bytes-like, a str holds a lone
                surrogate (it has no UTF-8 form), or the tokenizer needs valid UTF-8 (some
                BPE pre-tokenizers) and the bytes are not.
        """
        if isinstance(text, str):
            data = utf8(text, "tokenize: the text")
        elif isinstance(text, bytes | bytearray | memoryview):
            # Not bytes(x) on anything: bytes(5) is five NUL bytes, a silently wrong answer.
            data = bytes(text)
        else:
            raise InvalidArgumentError(f"tokenize expects str or bytes, got {type(text).__name__}")
        return self.model.tokenize(data, add_bos, special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """The bytes of ``tokens`` (may end inside a multi-byte character).

        Raises:
            InvalidArgumentError: A token id is not an int or is outside the vocabulary.
        """
        ids = list(tokens)
        try:
            return self.model.detokenize(ids, special)
        except TypeError:
            # The native call takes int32 ids: find the one that is not, for the message.
            for token in ids:
                if isinstance(token, bool) or not hasattr(token, "__index__"):
                    raise InvalidArgumentError(f"token ids must be ints, got {token!r}") from None
                if not 0 <= int(token) < self.n_vocab():
                    raise InvalidArgumentError(
                        f"token id {int(token)} is out of range [0, {self.n_vocab()})"
                    ) from None
            raise

    @abstractmethod
    def create_embedding(
        self,
        input: EmbeddingInput,
        model: str | None = None,
        *,
        cancellation: _core.Cancellation | None = None,
    ) -> CreateEmbeddingResponse:
        """OpenAI's embeddings response for ``input``."""

    def set_seed(self, seed: int) -> None:
        """Set the sampling seed used by calls that name none (as the constructor's ``seed``).

        Args:
            seed: In ``[0, 2**32)``; ``-1`` or ``DEFAULT_SEED``: a random seed each generation.

        Raises:
            InvalidArgumentError: ``seed`` is not an int in that range.
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed <= DEFAULT_SEED:
            raise InvalidArgumentError(f"seed must be an int in [0, 2**32) or -1, got {seed!r}")
        self._requests.seed = DEFAULT_SEED if seed == -1 else seed

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        json_schema: Mapping[str, Any] | None = None,
        parallel_tool_calls: bool = False,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> RenderedChat:
        """Render ``messages`` with llama.cpp's chat templates (on a :class:`Llama`, see
        :meth:`Llama.chat_templates`), as :meth:`create_chat_completion` does.

        Returns the prompt with what generating and parsing its answer needs: the grammar
        (tool calls, a JSON schema) and its lazy triggers, special tokens kept as text, extra
        stops, the format's name. ``chat_template_kwargs`` are variables of the template
        (``enable_thinking=False`` turns a hybrid model's thinking off; ``reasoning_effort``
        for GPT-OSS).

        ``json_schema``'s grammar is :func:`~llama_cpp.json_schema.schema_to_grammar`'s (as
        :meth:`create_chat_completion` uses it), not the template's.

        Raises:
            InvalidArgumentError: Malformed messages or tools, or the template rejected them.
            UnsupportedSchemaError: ``json_schema`` has a keyword the grammar cannot enforce.
            TemplateError: The template was refused, failed, or ran past its limits
                (``chat_template_timeout``, ``chat_template_max_output``,
                ``chat_template_max_depth``; docs/hardening.md).
        """
        schema_gbnf = schema_to_grammar(json_schema) if json_schema is not None else None
        params = self._requests.renderer.render(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            json_schema=json_schema,
            parallel_tool_calls=parallel_tool_calls,
            add_generation_prompt=add_generation_prompt,
            template_kwargs=chat_template_kwargs,
        )
        rendered = RenderedChat.from_native(params)
        if schema_gbnf is None:
            return rendered
        thinking = (chat_template_kwargs or {}).get("enable_thinking") is not False
        return replace(rendered, grammar=answer_grammar(schema_gbnf, params, "auto", thinking))

    # -- the native generation API --------------------------------------------------------

    def complete(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 16,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
        cancellation: _core.Cancellation | None = None,
    ) -> Completion:
        """Generate a completion of ``prompt``; the whole token loop runs in C++.

        The longest prefix that ``prompt`` shares with the tokens already in the KV cache (a
        pool: in any of its sequences) is reused rather than evaluated again.

        Args:
            prompt: Text (tokenized with BOS, special tokens parsed) or token ids.
            max_tokens: Most tokens to generate; None or <= 0 means until the context is full.
            sampling: Sampling settings (default: ``SamplingParams()``).
            stop: Strings that end the generation; they are not included in the text.
            cancellation: Lets another thread stop the generation (it then raises
                :class:`GenerationCancelled`).

        Returns:
            A :class:`Completion`.

        Raises:
            ContextOverflowError: The prompt does not fit in the context window.
            InvalidArgumentError: A sampling value or token id is out of range.
            ClosedError: The model was closed, possibly during the call.
            GenerationCancelled: ``cancellation`` was cancelled.
        """
        request = self._requests.generation(
            prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=cancellation
        )
        return Completion.from_outcome(self._generate(request, {}))

    @overload
    def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = ...,
        sampling: SamplingParams | None = ...,
        stop: str | Sequence[str] | None = ...,
        cancellation: _core.Cancellation | None = ...,
        stream: Literal[False] = ...,
    ) -> str: ...

    @overload
    def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = ...,
        sampling: SamplingParams | None = ...,
        stop: str | Sequence[str] | None = ...,
        cancellation: _core.Cancellation | None = ...,
        stream: Literal[True],
    ) -> Iterator[str]: ...

    def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
        cancellation: _core.Cancellation | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The generated text of ``prompt`` (see :meth:`complete` for the arguments).

        With ``stream=True``, an iterator of text pieces, as :meth:`generate_stream`.
        """
        if stream:
            return self.generate_stream(
                prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=cancellation
            )
        return self.complete(
            prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=cancellation
        ).text

    def generate_stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
        cancellation: _core.Cancellation | None = None,
    ) -> Generator[str, None, None]:
        """Yield text as it is generated; each piece is whole UTF-8 characters.

        Each step runs in C++ with the GIL released. Closing the iterator (or breaking out of
        a ``for`` loop over it) stops generation at once and leaves the instance usable.
        """
        request = self._requests.generation(
            prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=cancellation
        )
        return text_pieces(self._stream(request, {}))

    # -- llama-cpp-python's completion and chat API ----------------------------------------

    @overload
    def create_completion(
        self, prompt: Prompt, *, stream: Literal[False] = False, **kwargs: Any
    ) -> CreateCompletionResponse: ...

    @overload
    def create_completion(
        self, prompt: Prompt, *, stream: Literal[True], **kwargs: Any
    ) -> Iterator[CreateCompletionResponse]: ...

    def create_completion(
        self,
        prompt: Prompt,
        *,
        stream: bool = False,
        cancellation: _core.Cancellation | None = None,
        **kwargs: Any,
    ) -> CreateCompletionResponse | Iterator[CreateCompletionResponse]:
        """Complete ``prompt``, returning llama-cpp-python's (OpenAI's) completion dict.

        Keyword arguments and defaults are llama-cpp-python's: ``suffix`` (fill-in-the-middle
        for a model with FIM tokens: the text between ``prompt`` and ``suffix``, see
        :func:`llama_cpp.fim.fim_prompt`; ``echo`` then returns the prompt and that text),
        ``max_tokens``
        (16), ``stop``, ``echo``, ``logprobs``, ``model``, ``logits_processor`` /
        ``stopping_criteria`` (per-token Python hooks: the slow path, see
        :mod:`llama_cpp.hooks`), and the sampling settings, the fields of
        :class:`SamplingParams` (``temperature``, ``top_p``, ``top_k``, ``min_p``,
        ``seed``, ``grammar``, ``logit_bias``, penalties, Mirostat, DRY, XTC, ...).
        ``logprobs=k`` adds, per token, the log-softmax of the model's raw logits and the k
        most likely alternatives; with ``echo=True`` the prompt's tokens are scored too. With
        ``stream=True`` an iterator of chunk dicts is returned instead; the last chunk
        carries ``finish_reason``. ``cancellation`` lets another thread stop the generation.
        On a :class:`~llama_cpp.LlamaPool`, ``lora={adapter: scale}`` runs the request with
        those adapters (see :meth:`LlamaPool.submit`), and the Python hooks run on its
        scheduler thread.

        Raises:
            TypeError: An unknown keyword argument.
            PoolBusyError: A pool's slots and queue are all taken.
            ContextOverflowError: The prompt does not fit in the context window.
            InvalidArgumentError: A value is out of range; ``suffix`` with a model without FIM
                tokens, or with both ``echo`` and ``logprobs``.
        """
        run = self._run_options(kwargs)
        request = self._requests.completion(prompt, kwargs, cancellation=cancellation or _core.Cancellation())
        if stream:
            return request.chunks(self._stream(request.request, run))
        return request.response(self._generate(request.request, run))

    __call__ = create_completion

    @overload
    def create_chat_completion(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[False] = False, **kwargs: Any
    ) -> CreateChatCompletionResponse: ...

    @overload
    def create_chat_completion(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[True], **kwargs: Any
    ) -> Iterator[ChatCompletionChunk]: ...

    def create_chat_completion(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        stream: bool = False,
        cancellation: _core.Cancellation | None = None,
        **kwargs: Any,
    ) -> CreateChatCompletionResponse | Iterator[ChatCompletionChunk]:
        """Answer a conversation, returning llama-cpp-python's (OpenAI's) chat dicts.

        The messages are rendered by the model's chat template (see :meth:`render_chat`),
        tokenized with special tokens parsed, and completed; generation ends at the model's
        end of turn. The answer is parsed by the model's format: ``message["content"]``,
        ``message["reasoning_content"]`` (a thinking model's reasoning, unless
        ``reasoning_format="none"`` leaves it in the content) and ``message["tool_calls"]``
        (``finish_reason="tool_calls"``).

        Keyword arguments: llama-cpp-python's (``tools``, ``tool_choice``, ``functions``,
        ``function_call``, ``response_format``, ``max_tokens`` (None: until the end of the
        turn), ``stop``, ``logprobs`` + ``top_logprobs``, ``model``, ``logits_processor``,
        ``stopping_criteria``, the sampling settings of :meth:`create_completion`, with
        ``temperature`` 0.2 by default), and ``parallel_tool_calls``, ``reasoning_format``,
        ``reasoning_effort`` and ``chat_template_kwargs`` (variables of the template:
        ``{"enable_thinking": False}``, ...).

        ``tool_choice``: ``"auto"``, ``"none"``, ``"required"``, ``{"type": "function",
        "function": {"name": ...}}``, or the bare name of one of the tools, as LangChain's
        ``bind_tools`` passes it; a forced call is constrained by a grammar so that it always
        parses, and under ``"auto"`` the grammar takes over once the model starts a call.
        ``response_format`` (``json_object``, with or without ``schema``, or OpenAI's
        ``json_schema``) constrains the answer to the schema (the grammar of
        :func:`~llama_cpp.json_schema.schema_to_grammar`), and the completed answer is
        validated against it with ``jsonschema``. With ``stream=True``:
        ``chat.completion.chunk`` dicts, the role first, then content, reasoning and tool-call
        deltas, ``finish_reason`` last. ``cancellation`` lets another thread stop the
        generation. A :class:`~llama_cpp.LlamaPool` also takes ``lora=``, as
        :meth:`create_completion`.

        Raises:
            PoolBusyError: A pool's slots and queue are all taken.
            TypeError: An unknown keyword argument (a template variable passed as one).
            InvalidArgumentError: Malformed messages or tools, or the template rejected them.
            UnsupportedSchemaError: A ``response_format`` schema with a keyword the grammar
                cannot enforce (named in ``.keywords``), before anything is generated.
            GrammarError: A ``response_format`` schema that is not a valid JSON schema.
            SchemaValidationError: The completed answer (``finish_reason`` ``"stop"``) breaks
                its schema, or a tool call's arguments its tool's ``parameters``; in a stream,
                raised at its end in place of the finish reason's chunk.
        """
        run = self._run_options(kwargs)
        request = self._requests.chat(messages, kwargs, cancellation=cancellation or _core.Cancellation())
        if stream:
            return request.chunks(self._stream(request.request, run))
        return request.response(self._generate(request.request, run))

    @overload
    def create_chat_completion_openai_v1(
        self, *args: Any, stream: Literal[False] = False, **kwargs: Any
    ) -> OpenAIChatCompletion: ...

    @overload
    def create_chat_completion_openai_v1(
        self, *args: Any, stream: Literal[True], **kwargs: Any
    ) -> Iterator[OpenAIChatCompletionChunk]: ...

    def create_chat_completion_openai_v1(
        self, *args: Any, stream: bool = False, **kwargs: Any
    ) -> OpenAIChatCompletion | Iterator[OpenAIChatCompletionChunk]:
        """:meth:`create_chat_completion` (same arguments) returning the ``openai`` package's
        pydantic types, as llama-cpp-python's method of this name (instructor patches it).

        Returns:
            ``openai.types.chat.ChatCompletion``; with ``stream=True`` an iterator of
            ``ChatCompletionChunk`` (closing it stops the generation).

        Raises:
            ImportError: The ``openai`` package is not installed.
            InvalidArgumentError: ``stream`` is not a bool, or as :meth:`create_chat_completion`.
        """
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError as error:
            raise ImportError(
                "create_chat_completion_openai_v1 needs the openai package: pip install openai"
            ) from error
        if not isinstance(stream, bool):
            raise InvalidArgumentError(f"stream must be a bool, got {stream!r}")
        if stream:
            return openai_chunks(
                self.create_chat_completion(*args, stream=True, **kwargs), ChatCompletionChunk
            )
        return ChatCompletion.model_validate(self.create_chat_completion(*args, stream=False, **kwargs))

    # -- async twins: the same calls off the event loop ------------------------------------
    #
    # Preparing a request (template, tokens, grammar) and waiting for the context or a slot
    # happen in the worker thread too: the event loop only receives results.

    async def complete_async(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 16,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Completion:
        """:meth:`complete` off the event loop; cancelling the task stops the generation."""
        return await _async.call(
            lambda c: self.complete(
                prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=c
            )
        )

    async def generate_async(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> str:
        """:meth:`generate` off the event loop; cancelling the task stops the generation."""
        completion = await self.complete_async(prompt, max_tokens=max_tokens, sampling=sampling, stop=stop)
        return completion.text

    async def generate_stream_async(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> AsyncIterator[str]:
        """An async iterator of text pieces (``async for piece in await
        llm.generate_stream_async(...)``); leaving it early or cancelling stops generation."""
        return await _async.stream(
            lambda c: self.generate_stream(
                prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=c
            )
        )

    @overload
    async def create_completion_async(
        self, prompt: Prompt, *, stream: Literal[False] = False, **kwargs: Any
    ) -> CreateCompletionResponse: ...

    @overload
    async def create_completion_async(
        self, prompt: Prompt, *, stream: Literal[True], **kwargs: Any
    ) -> AsyncIterator[CreateCompletionResponse]: ...

    async def create_completion_async(
        self, prompt: Prompt, *, stream: bool = False, **kwargs: Any
    ) -> CreateCompletionResponse | AsyncIterator[CreateCompletionResponse]:
        """:meth:`create_completion` off the event loop (same keyword arguments).

        With ``stream=True`` it returns an async iterator of chunks (``async for chunk in
        await llm.create_completion_async(..., stream=True)``). Cancelling the task, or
        leaving the ``async for`` early, stops the generation in C++.
        """
        if stream:
            return await _async.stream(
                lambda c: self.create_completion(prompt, stream=True, cancellation=c, **kwargs)
            )
        return await _async.call(lambda c: self.create_completion(prompt, cancellation=c, **kwargs))

    @overload
    async def create_chat_completion_async(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[False] = False, **kwargs: Any
    ) -> CreateChatCompletionResponse: ...

    @overload
    async def create_chat_completion_async(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[True], **kwargs: Any
    ) -> AsyncIterator[ChatCompletionChunk]: ...

    async def create_chat_completion_async(
        self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, **kwargs: Any
    ) -> CreateChatCompletionResponse | AsyncIterator[ChatCompletionChunk]:
        """:meth:`create_chat_completion` off the event loop (same keyword arguments).

        With ``stream=True`` it returns an async iterator of chunks; cancelling the task or
        leaving the ``async for`` early stops the generation.
        """
        if stream:
            return await _async.stream(
                lambda c: self.create_chat_completion(messages, stream=True, cancellation=c, **kwargs)
            )
        return await _async.call(lambda c: self.create_chat_completion(messages, cancellation=c, **kwargs))

    async def create_embedding_async(
        self, input: EmbeddingInput, model: str | None = None
    ) -> CreateEmbeddingResponse:
        """:meth:`create_embedding` off the event loop; cancelling the task stops it."""
        return await _async.call(lambda c: self.create_embedding(input, model, cancellation=c))


def text_pieces(stream: GenerationStream) -> Generator[str, None, None]:
    """The text pieces of a native stream; closing the generator closes the stream."""
    try:
        while (piece := stream.next()) is not None:
            if piece.text:
                yield piece.text
    finally:
        stream.close()
