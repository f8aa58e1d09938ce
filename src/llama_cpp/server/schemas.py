"""Request bodies of the OpenAI routes: OpenAI's fields and llama.cpp's sampling extras.

Unknown fields are accepted and ignored (``extra="ignore"``), as OpenAI-compatible servers
do, so clients that send newer fields keep working; the known ones are validated and show
up in ``/docs`` and ``/openapi.json``. :meth:`_Sampling.keywords` turns a body into the
library's ``create_*`` keywords.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from llama_cpp.errors import GrammarError
from llama_cpp.grammar import LlamaGrammar
from llama_cpp.server.errors import APIError

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "EmbeddingRequest",
    "InfillRequest",
    "ModelRequest",
    "RerankRequest",
    "TemplateRequest",
    "TokenizeRequest",
]

#: A token id as llama.cpp takes it (int32; ids beyond the vocabulary are the library's 400).
Token = Annotated[int, Field(ge=0, lt=2**31)]


def _encodable(text: str) -> str:
    # JSON may carry a lone surrogate ("\ud800"), which no UTF-8 encoder takes.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not encodable as UTF-8: {error.reason}") from error
    return text


#: Text that will be encoded as UTF-8 for the model (a 400 otherwise, not a 500).
Text = Annotated[str, AfterValidator(_encodable)]

#: Body fields passed to the library under the same name.
_SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
    "presence_penalty", "penalty_last_n", "mirostat_mode", "mirostat_tau", "mirostat_eta",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers",
    "xtc_probability", "xtc_threshold", "top_n_sigma", "seed", "stop",
)  # fmt: skip


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The sampling fields that completions and chat share."""

    model: str | None = Field(default=None, description="A model alias of GET /v1/models")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, description="Choices to generate, at most the server's parallel slots")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    # llama.cpp's sampling extras (llama-server's names).
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    typical_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, ge=0)
    penalty_last_n: int | None = Field(default=None, ge=-1)
    mirostat_mode: int | None = Field(default=None, ge=0, le=2)
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    dry_multiplier: float | None = Field(default=None, ge=0)
    dry_base: float | None = Field(default=None, ge=1)
    dry_allowed_length: int | None = Field(default=None, ge=0)
    dry_penalty_last_n: int | None = Field(default=None, ge=-1)
    dry_sequence_breakers: list[str] | None = None
    xtc_probability: float | None = Field(default=None, ge=0, le=1)
    xtc_threshold: float | None = Field(default=None, ge=0, le=1)
    top_n_sigma: float | None = None
    grammar: str | None = Field(default=None, description="A GBNF grammar the output must satisfy")

    def keywords(self) -> dict[str, Any]:
        """The library keywords of the fields the client set (its defaults for the others)."""
        given = self.model_fields_set
        out: dict[str, Any] = {
            k: getattr(self, k) for k in _SAMPLING if k in given and getattr(self, k) is not None
        }
        if "dry_sequence_breakers" in out:
            out["dry_sequence_breakers"] = tuple(out["dry_sequence_breakers"])
        if self.logit_bias:
            try:
                out["logit_bias"] = {int(token): bias for token, bias in self.logit_bias.items()}
            except ValueError as error:
                raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from error
        if self.grammar is not None:
            try:
                out["grammar"] = LlamaGrammar.from_string(self.grammar, verbose=False)
            except (GrammarError, ValueError) as error:
                raise APIError(
                    400, f"invalid grammar: {error}", param="grammar", code="invalid_grammar"
                ) from error
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        return out


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Wins over max_tokens")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    reasoning_effort: str | None = None
    reasoning_format: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def keywords(self) -> dict[str, Any]:
        out = super().keywords()
        if self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        for name in (
            "tools", "tool_choice", "parallel_tool_calls", "response_format", "logprobs", "top_logprobs",
            "reasoning_effort", "reasoning_format", "chat_template_kwargs",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if out.get("top_logprobs") and not out.get("logprobs"):
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        if self.stream_options is not None:
            out["stream_options"] = self.stream_options.model_dump()
        return out


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[Token] | list[list[Token]]
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=None, ge=1, description="16 (or the server's limit) if absent")

    def keywords(self) -> dict[str, Any]:
        out = super().keywords()
        for name in ("suffix", "echo", "logprobs"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.stream_options is not None:
            out["stream_options"] = self.stream_options.model_dump()
        return out

    def prompts(self) -> list[Any]:
        """The prompts: one text or token list, or several."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return list(prompt)


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``."""

    input: str | list[str] | list[Token] | list[list[Token]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, description="Not supported: must be absent")


class RerankRequest(_Body):
    """``POST /v1/rerank`` (and ``/rerank``): llama-server's and Jina's body."""

    model: str | None = Field(default=None, description="A reranker alias (kind reranker)")
    query: Text
    documents: list[Text] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1, description="Return the best top_n (default: all)")
    return_documents: bool = Field(default=True, description="Each result carries {document: {text}}")
    normalize: bool = Field(
        default=False, description="Scores through the logistic sigmoid, in (0, 1) (default: raw)"
    )


class InfillChunk(_Body):
    """One chunk of ``/infill``'s repository context (llama-server's ``input_extra`` item)."""

    text: Text = Field(description="The chunk's text")
    filename: Text = Field(default="tmp", description="The file it comes from")


class InfillRequest(_Sampling):
    """``POST /infill``: llama-server's fill-in-the-middle body (its sampling fields too)."""

    input_prefix: Text = Field(description="The text before the gap")
    input_suffix: Text = Field(description="The text after the gap")
    prompt: Text = Field(
        default="", description="Text that continues the prefix (placed after it, before FIM_SUF)"
    )
    input_extra: list[InfillChunk] = Field(
        default_factory=list,
        description="Repository context: chunks put ahead of the FIM prompt, as far as the window allows",
    )
    n_predict: int | None = Field(
        default=None, ge=-1, lt=2**31, description="Tokens to generate at most (-1: the server's limit)"
    )
    max_tokens: int | None = Field(default=None, ge=0, lt=2**31, description="n_predict's alias")

    def keywords(self) -> dict[str, Any]:
        out = super().keywords()
        out.pop("max_tokens", None)
        limit = self.n_predict if self.n_predict is not None else self.max_tokens
        if limit == 0:
            param = "n_predict" if self.n_predict is not None else "max_tokens"
            raise APIError(
                400,
                f"{param} 0 (evaluate the prompt only) is not supported",
                param=param,
                code="invalid_value",
            )
        if limit is not None and limit > 0:
            out["max_tokens"] = limit
        if self.stream_options is not None:
            out["stream_options"] = self.stream_options.model_dump()
        return out


class ModelRequest(_Body):
    """``POST /models/load`` and ``/models/unload``."""

    model: str


class TokenizeRequest(_Body):
    """``POST /tokenize``."""

    content: str
    add_special: bool = True
    parse_special: bool = False
    model: str | None = None


class DetokenizeRequest(_Body):
    """``POST /detokenize``."""

    tokens: list[Token]
    model: str | None = None


class TemplateRequest(_Body):
    """``POST /apply-template``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    model: str | None = None
