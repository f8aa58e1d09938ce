"""One request path: a completion or chat request turned into what a front end decodes, and
what it decodes turned into OpenAI dicts.

:class:`~llama_cpp.Llama` (one context) and :class:`~llama_cpp.LlamaPool` (a slot of the
engine) both prepare every request with a :class:`RequestBuilder` and build every answer
with the :class:`CompletionRequest` / :class:`ChatRequest` it returns; the only thing that
differs between them is where the tokens are decoded. Keywords are checked here, once, and
the same way for both: an unknown keyword raises :class:`TypeError`. The sampling keywords
are the fields of :class:`~llama_cpp.SamplingParams`, listed there and nowhere else.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from llama_cpp import _core, fim, hooks
from llama_cpp._options import generate_options, utf8
from llama_cpp.chat import ChatGrammar, ChatRenderer
from llama_cpp.chat_output import OutputParser, chat_chunks, chat_response
from llama_cpp.completion_output import CompletionBuilder, GenerationStream, Outcome
from llama_cpp.config import LlamaConfig
from llama_cpp.errors import InvalidArgumentError
from llama_cpp.grammar import LlamaGrammar
from llama_cpp.llama_types import (
    ChatCompletionChunk,
    CreateChatCompletionResponse,
    CreateCompletionResponse,
)
from llama_cpp.params import DEFAULT_SEED, SamplingParams
from llama_cpp.structured import AnswerCheck, StreamedAnswer

__all__ = ["CHAT_KEYWORDS", "COMPLETION_KEYWORDS", "SAMPLING_KEYWORDS", "ChatRequest", "CompletionRequest"]

Prompt = str | bytes | Sequence[int]
_log = logging.getLogger("llama_cpp")

#: The sampling keywords of every request: the fields of SamplingParams.
SAMPLING_KEYWORDS = frozenset(f.name for f in fields(SamplingParams))

#: ``create_completion``'s keywords besides the sampling ones (llama-cpp-python's).
COMPLETION_KEYWORDS = frozenset(
    {
        "suffix",
        "max_tokens",
        "logprobs",
        "echo",
        "stop",
        "model",
        "logits_processor",
        "stopping_criteria",
        "stream_options",
    }
)

#: ``create_chat_completion``'s keywords besides the sampling ones: llama-cpp-python's, and
#: OpenAI's ``reasoning_effort`` (a template variable, as llama-server passes it).
CHAT_KEYWORDS = frozenset(
    {
        "functions",
        "function_call",
        "tools",
        "tool_choice",
        "response_format",
        "max_tokens",
        "stop",
        "model",
        "logprobs",
        "top_logprobs",
        "logits_processor",
        "stopping_criteria",
        "parallel_tool_calls",
        "reasoning_format",
        "reasoning_effort",
        "chat_template_kwargs",
        "stream_options",
    }
)

#: llama-cpp-python keywords of samplers that llama.cpp removed, and the value that turns each
#: off: accepted at that value (llama-cpp-python passes it by default), refused at any other.
REMOVED_KEYWORDS: Mapping[str, object] = {"tfs_z": 1.0}

#: Where a chat request's defaults differ from a completion's (llama-cpp-python's).
_CHAT_DEFAULTS: Mapping[str, Any] = {"temperature": 0.2, "max_tokens": None}


def check_keywords(where: str, given: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """Raise TypeError naming the keywords of ``given`` that ``where`` does not take."""
    unknown = sorted(set(given) - allowed)
    if unknown:
        hint = ""
        if where.endswith("create_chat_completion"):
            hint = " (variables of the chat template go in chat_template_kwargs={...})"
        raise TypeError(f"{where}() got unexpected keyword arguments {unknown}{hint}")


@dataclass(frozen=True, slots=True)
class Request:
    """What a front end decodes: prompt tokens, sampler and options (stops, limits, hooks,
    logprobs, cancellation)."""

    tokens: list[int]
    sampling: _core.SamplerConfig
    options: _core.GenerateOptions


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A prepared ``create_completion``: run :attr:`request`, then build the answer."""

    request: Request
    builder: CompletionBuilder

    def response(self, outcome: Outcome) -> CreateCompletionResponse:
        """The ``text_completion`` dict of a finished generation."""
        return self.builder.response(outcome)

    def chunks(self, stream: GenerationStream) -> Iterator[CreateCompletionResponse]:
        """The chunks of a native stream (closing the iterator closes the stream)."""
        return self.builder.stream(stream)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A prepared ``create_chat_completion``: run :attr:`request`, then build the answer."""

    completion: CompletionRequest
    parser: OutputParser
    check: AnswerCheck | None = None

    @property
    def request(self) -> Request:
        return self.completion.request

    def response(self, outcome: Outcome) -> CreateChatCompletionResponse:
        """The ``chat.completion`` dict of a finished generation, parsed by the chat format.

        Raises:
            SchemaValidationError: A completed answer breaks its ``response_format`` schema,
                or a tool call's arguments its tool's ``parameters``.
        """
        response = chat_response(self.completion.response(outcome), self.parser)
        if getattr(self.parser, "fell_back", False):
            _log.warning("the model's answer did not follow its chat format; it is returned as plain content")
        if self.check is not None:
            choice = response["choices"][0]
            self.check.check(choice["message"], choice["finish_reason"])
        return response

    def chunks(self, stream: GenerationStream) -> Iterator[ChatCompletionChunk]:
        """The ``chat.completion.chunk`` dicts of a native stream; with a schema or tools,
        SchemaValidationError is raised in place of the finish reason's chunk when the
        completed answer is invalid (see :meth:`response`)."""
        chunks = chat_chunks(self.completion.chunks(stream), self.parser)
        if self.check is None:
            return chunks
        return StreamedAnswer(self.check).chunks(chunks)


class RequestBuilder:
    """Prepares the requests of one model: tokens, sampler, options and answer builders.

    Args:
        model: The model (tokenizer, chat templates).
        config: Its settings: ``seed`` (the default sampling seed), ``chat_template``,
            ``chat_format`` and the ``chat_template_*`` limits.
        name: The ``model`` field of the answers, unless a request names one.
    """

    def __init__(self, model: _core.Model, config: LlamaConfig, name: str) -> None:
        self._model = model
        self._name = name
        self.seed = config.seed
        self.renderer = ChatRenderer(
            model,
            config.chat_template,
            config.chat_format,
            time_limit=config.chat_template_timeout,
            max_output_bytes=config.chat_template_max_output,
            max_macro_depth=config.chat_template_max_depth,
        )

    def close(self) -> None:
        """Drop what holds the model (the chat templates)."""
        self.renderer.close()

    # -- pieces ---------------------------------------------------------------------------

    def prompt_tokens(self, prompt: Prompt) -> list[int]:
        """Text tokenized as llama-cpp-python does (BOS/EOS where the model asks, special
        tokens parsed), or token ids as they are."""
        if isinstance(prompt, str):
            return self._model.tokenize(utf8(prompt, "prompt"), True, True)
        if isinstance(prompt, bytes | bytearray):
            return self._model.tokenize(bytes(prompt), True, True)
        if not isinstance(prompt, Iterable) or isinstance(prompt, Mapping):
            raise InvalidArgumentError(
                f"prompt must be str, bytes or a sequence of token ids, got {type(prompt).__name__}"
            )
        ids: list[int] = []
        try:
            for token in prompt:  # numpy integers too; not bools, floats, strings or rows
                if isinstance(token, bool) or not hasattr(token, "__index__"):
                    raise InvalidArgumentError(f"token ids must be ints, got {token!r}")
                ids.append(operator.index(token))
        except TypeError as e:  # a 0-d array (not iterable), a 2-d one (rows are no index)
            raise InvalidArgumentError(f"prompt must be a flat sequence of token ids ({e})") from None
        # The vocabulary's range is checked where the ids are used; here, what int32 holds.
        if ids and not (min(ids) >= 0 and max(ids) < 2**31):
            bad = next(t for t in ids if not 0 <= t < 2**31)
            raise InvalidArgumentError(f"token id {bad} is out of range")
        return ids

    def piece(self, token: int) -> str:
        """The text of one token (special tokens as nothing)."""
        return self._model.token_to_piece(token, False).decode("utf-8", errors="ignore")

    def sampler(self, sampling: SamplingParams | None = None, **overrides: Any) -> _core.SamplerConfig:
        """The native sampler of ``sampling`` with ``overrides``, seeded with :attr:`seed`
        when neither names one.

        Raises:
            InvalidArgumentError: The seed is out of range (other values are checked when
                the generation starts).
        """
        params = sampling or SamplingParams()
        if "logit_bias" in overrides and overrides["logit_bias"] is None:
            overrides["logit_bias"] = {}
        if isinstance(overrides.get("dry_sequence_breakers"), list):
            # A tuple, as the frozen dataclass holds it; anything else is refused by to_native.
            overrides["dry_sequence_breakers"] = tuple(overrides["dry_sequence_breakers"])
        if overrides.get("seed", params.seed) is None and self.seed != DEFAULT_SEED:
            overrides["seed"] = self.seed
        grammar = overrides.get("grammar", params.grammar)
        if grammar is not None and not isinstance(grammar, LlamaGrammar):
            raise InvalidArgumentError(f"grammar must be a LlamaGrammar, got {type(grammar).__name__}")
        return (replace(params, **overrides) if overrides else params).to_native()

    # -- requests -------------------------------------------------------------------------

    def generation(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None,
        sampling: SamplingParams | None,
        stop: str | Sequence[str] | None,
        cancellation: _core.Cancellation | None = None,
    ) -> Request:
        """The request of the native API (``complete``, ``generate``): no answer dicts."""
        options = generate_options(max_tokens, stop, cancellation=cancellation)
        return Request(self.prompt_tokens(prompt), self.sampler(sampling), options)

    def completion(
        self,
        prompt: Prompt,
        keywords: Mapping[str, Any],
        *,
        cancellation: _core.Cancellation,
        where: str = "create_completion",
        preserved_tokens: Sequence[int] = (),
    ) -> CompletionRequest:
        """A ``create_completion`` request: ``keywords`` are its keyword arguments.

        Raises:
            TypeError: An unknown keyword.
            InvalidArgumentError: ``logprobs`` is negative, ``suffix`` with a model without
                fill-in-the-middle tokens (or with both ``echo`` and ``logprobs``), a seed out
                of range.
        """
        check_keywords(where, keywords, COMPLETION_KEYWORDS | SAMPLING_KEYWORDS | REMOVED_KEYWORDS.keys())
        for name, off in REMOVED_KEYWORDS.items():
            if name in keywords and keywords[name] != off:
                raise InvalidArgumentError(
                    f"{name}={keywords[name]!r}: this sampler was removed from llama.cpp; only {off!r} (off) "
                    "is accepted"
                )
        sampling = {k: v for k, v in keywords.items() if k in SAMPLING_KEYWORDS}
        suffix = keywords.get("suffix")
        echo = bool(keywords.get("echo", False))
        logprobs = keywords.get("logprobs")
        if suffix is None:
            tokens = self.prompt_tokens(prompt)
            prompt_text = (
                self._model.detokenize(tokens, False).decode("utf-8", errors="replace") if echo else ""
            )
        else:
            tokens, prompt_text = fim.infill_request(
                self._model, prompt, suffix, echo=echo, logprobs=logprobs
            )
        builder = CompletionBuilder(
            model=keywords.get("model") or self._name,
            piece=self.piece,
            echo=echo,
            prompt_tokens=tokens,
            prompt_text=prompt_text,
            logprobs=logprobs is not None,
            include_usage=_include_usage(keywords.get("stream_options")),
        )
        options = generate_options(
            keywords.get("max_tokens", 16),
            keywords.get("stop"),
            logprobs=logprobs,
            prompt_logprobs=echo,
            cancellation=cancellation,
        )
        options.preserved_tokens = list(preserved_tokens)
        hooks.install(options, keywords.get("logits_processor"), keywords.get("stopping_criteria"))
        return CompletionRequest(Request(tokens, self.sampler(None, **sampling), options), builder)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        keywords: Mapping[str, Any],
        *,
        cancellation: _core.Cancellation,
        where: str = "create_chat_completion",
    ) -> ChatRequest:
        """A ``create_chat_completion`` request: ``keywords`` are its keyword arguments.

        Raises:
            TypeError: An unknown keyword (template variables go in ``chat_template_kwargs``).
            InvalidArgumentError: Malformed messages, tools or values.
            UnsupportedSchemaError: A ``response_format`` schema with a keyword the grammar
                cannot enforce (raised before anything is generated or queued).
            GrammarError: A ``response_format`` schema that is not a valid JSON schema.
        """
        check_keywords(where, keywords, CHAT_KEYWORDS | SAMPLING_KEYWORDS | REMOVED_KEYWORDS.keys())
        given = {**_CHAT_DEFAULTS, **keywords}
        variables = dict(given.pop("chat_template_kwargs", None) or {})
        if "reasoning_effort" in given:
            effort = given.pop("reasoning_effort")
            if effort is not None:
                variables["reasoning_effort"] = effort
        grammar = given.pop("grammar", None)
        if grammar is not None and not isinstance(grammar, LlamaGrammar):
            raise InvalidArgumentError(f"grammar must be a LlamaGrammar, got {type(grammar).__name__}")
        prepared = self.renderer.prepare(
            messages,
            functions=given.pop("functions", None),
            function_call=given.pop("function_call", None),
            tools=given.pop("tools", None),
            tool_choice=given.pop("tool_choice", None),
            response_format=given.pop("response_format", None),
            grammar=grammar,
            parallel_tool_calls=given.pop("parallel_tool_calls", False),
            reasoning_format=given.pop("reasoning_format", "auto"),
            template_kwargs=variables,
        )
        # OpenAI's chat shape: a logprobs flag and a count of alternatives.
        top_logprobs = given.pop("top_logprobs", None)
        given["logprobs"] = (top_logprobs or 0) if given.pop("logprobs", None) else None
        stop = given.get("stop")
        given["stop"] = ([stop] if isinstance(stop, str) else list(stop or ())) + prepared.stop
        completion = self.completion(
            prepared.prompt,
            given,
            cancellation=cancellation,
            where=where,
            preserved_tokens=prepared.preserved_tokens,
        )
        if prepared.grammar is not None:
            _set_grammar(completion.request.sampling, prepared.grammar)
        return ChatRequest(completion, prepared.parser, prepared.check)


def _include_usage(stream_options: object) -> bool:
    """OpenAI's ``stream_options={"include_usage": True}``: a last chunk with the usage."""
    if stream_options is None:
        return False
    if not isinstance(stream_options, Mapping):
        raise InvalidArgumentError(f"stream_options must be a dict, got {stream_options!r}")
    return bool(stream_options.get("include_usage", False))


def _set_grammar(native: _core.SamplerConfig, grammar: ChatGrammar) -> None:
    if isinstance(grammar, _core.ChatParams):
        _set_chat_grammar(native, grammar)
        return
    native.grammar = grammar.grammar
    native.grammar_root = grammar.root
    native.grammar_lazy = grammar.lazy
    native.grammar_trigger_patterns = list(grammar.trigger_patterns)
    native.grammar_trigger_tokens = list(grammar.trigger_tokens)
    native.grammar_prefill = list(grammar.prefill_tokens)


def _set_chat_grammar(native: _core.SamplerConfig, params: _core.ChatParams) -> None:
    """The grammar a chat template made, handed to the sampler as it is (llama.cpp made it:
    it is not parsed again in Python)."""
    native.grammar = params.grammar
    native.grammar_root = "root"
    native.grammar_lazy = params.grammar_lazy
    native.grammar_trigger_patterns = list(params.grammar_trigger_patterns)
    native.grammar_trigger_tokens = list(params.grammar_trigger_tokens)
    native.grammar_prefill = list(params.grammar_prefill)
