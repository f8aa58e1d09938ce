"""The server's settings: one model, read from defaults, a config file, the environment and flags.

Precedence, lowest to highest: the defaults below, a JSON or TOML file (``--config FILE``, keys
are the field names), environment variables ``LLAMA_CPP_SERVER_<FIELD>`` (``api_keys`` and
``models`` as JSON, or ``api_keys`` as a comma-separated list), command-line flags. An unknown
key in the file or an unknown ``LLAMA_CPP_SERVER_*`` variable is an error, not ignored.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["ENV_PREFIX", "ModelKind", "ModelSettings", "ServerSettings", "SettingsError", "load_settings"]

ENV_PREFIX = "LLAMA_CPP_SERVER_"

#: What a model alias serves: ``"generate"`` (a :class:`~llama_cpp.LlamaPool`: chat,
#: completions, embeddings, infill, ...) or ``"reranker"`` (a reranker GGUF loaded as a
#: :class:`~llama_cpp.Llama` with ``embedding=True``: ``/v1/rerank`` only).
ModelKind = Literal["generate", "reranker"]


class SettingsError(ValueError):
    """The settings are malformed: an unknown key, a bad value, an unreadable file."""


class ModelSettings(BaseModel):
    """One model the server may load, under an alias.

    Attributes:
        path: The GGUF file.
        parallel: Requests decoded concurrently (the pool's ``pool_size``); None: the server's.
        ctx_size: The window of each sequence; None: the server's.
        max_queue: Requests that may wait for a slot; None: the server's.
        options: Further :class:`~llama_cpp.LlamaPool` keywords (``n_gpu_layers``,
            ``n_batch``, ``flash_attn``, ...); of a reranker, :class:`~llama_cpp.Llama`'s.
        kind: ``"generate"``, or ``"reranker"``: a reranker GGUF (rank pooling) that serves
            ``/v1/rerank`` only, one request at a time (``parallel`` and ``max_queue`` do
            not apply).
    """

    model_config = ConfigDict(extra="forbid")

    path: Path
    kind: ModelKind = "generate"
    parallel: int | None = Field(default=None, ge=1)
    ctx_size: int | None = Field(default=None, ge=0)
    max_queue: int | None = Field(default=None, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)


class ServerSettings(BaseModel):
    """Everything ``llama-cpp serve`` and :func:`~llama_cpp.server.create_app` take.

    Attributes:
        model: The default model's GGUF file (loaded at startup).
        alias: The default model's name for clients (default: the file name without ``.gguf``).
        options: Further :class:`~llama_cpp.LlamaPool` keywords of the default model
            (``n_gpu_layers``, ``pooling_type`` for ``/v1/embeddings``, ...).
        kind: The default model's kind (``"reranker"``: it serves ``/v1/rerank`` only).
        models: More models by alias, each loaded on first use.
        models_max: Models resident at once; the least recently used idle one is unloaded.
        host: The address to bind (127.0.0.1: this machine only).
        port: The TCP port (0: any free port).
        parallel: Requests decoded concurrently per model (the pool's ``pool_size``).
        ctx_size: The window of each sequence, in tokens.
        n_threads: CPU threads per model (None: llama.cpp's default).
        max_queue: Requests that may wait for a slot; one more is answered 429.
        api_keys: Keys accepted as ``Authorization: Bearer KEY`` or ``x-api-key: KEY``; empty:
            no authentication.
        api_key_file: A file of more keys, one a line (blank lines and ``#`` comments skipped).
        max_body_bytes: Largest request body (413 above).
        max_tokens_limit: Largest ``max_tokens`` / ``max_completion_tokens`` a request may ask
            (400 above); also the default of a chat request that names none.
        graceful_shutdown_s: On SIGTERM, seconds in-flight requests may take to finish
            before the pools are closed (which cancels them).
        profile_experts: Count the expert routing of every generating model (served by
            ``/api/v1/expert-stats``); one alias alone: ``profile_experts`` in its ``options``.
        isolated: Run each generating model in a supervised child process
            (:class:`~llama_cpp.IsolatedPool`): a model process that dies (an RPC worker lost
            mid-generation) fails its requests with 503 ``worker_lost`` and is reloaded,
            instead of ending the server. No embeddings then.
    """

    model_config = ConfigDict(extra="forbid")

    model: Path | None = None
    alias: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    kind: ModelKind = "generate"
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    models_max: int = Field(default=4, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    parallel: int = Field(default=4, ge=1)
    ctx_size: int = Field(default=4096, ge=0)
    n_threads: int | None = Field(default=None, ge=1)
    max_queue: int = Field(default=64, ge=0)
    api_keys: list[str] = Field(default_factory=list)
    api_key_file: Path | None = None
    max_body_bytes: int = Field(default=16 * 2**20, ge=1)
    max_tokens_limit: int = Field(default=32768, ge=1)
    graceful_shutdown_s: float = Field(default=10.0, ge=0)
    profile_experts: bool = False
    isolated: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _check_aliases(self) -> ServerSettings:
        if self.model is not None and self.default_alias() in self.models:
            raise ValueError(f"alias {self.default_alias()!r} names both --model and an entry of models")
        return self

    def default_alias(self) -> str | None:
        """The default model's alias (None without a default model)."""
        if self.model is None:
            return None
        return self.alias or self.model.name.removesuffix(".gguf")

    def model_table(self) -> dict[str, ModelSettings]:
        """Every servable model by alias, the default first."""
        table: dict[str, ModelSettings] = {}
        alias = self.default_alias()
        if alias is not None and self.model is not None:
            table[alias] = ModelSettings(path=self.model, options=self.options, kind=self.kind)
        table.update(self.models)
        return table

    def accepted_keys(self) -> frozenset[str]:
        """``api_keys`` and the keys of ``api_key_file``.

        Raises:
            SettingsError: The key file cannot be read.
        """
        keys = set(self.api_keys)
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
            except OSError as error:
                raise SettingsError(f"cannot read the API key file: {error}") from error
            keys.update(s for line in lines if (s := line.strip()) and not s.startswith("#"))
        return frozenset(keys)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SettingsError(f"cannot read the config file: {error}") from error
    try:
        data: object = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise SettingsError(f"{path}: not valid {kind}: {error}") from error
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the config must be a table of settings")
    _check_keys(data, f"{path}")
    return data


def _check_keys(data: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(data) - set(ServerSettings.model_fields))
    if unknown:
        known = ", ".join(ServerSettings.model_fields)
        raise SettingsError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {known})")


def _read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name.removeprefix(ENV_PREFIX).lower()
        if key not in ServerSettings.model_fields:
            raise SettingsError(f"unknown environment variable {name}")
        if key == "models" or (key == "api_keys" and value.lstrip().startswith("[")):
            try:
                data[key] = json.loads(value)
            except ValueError as error:
                raise SettingsError(f"{name}: not valid JSON: {error}") from error
        else:
            data[key] = value
    return data


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerSettings:
    """The settings from a config file, the environment and ``overrides`` (flags), in that order.

    Args:
        config_file: A ``.json`` or ``.toml`` file of settings (None: none).
        overrides: Settings that win over everything (None values are left out).
        environ: The environment (default ``os.environ``).

    Raises:
        SettingsError: An unknown key, a malformed file or value.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        data.update(_read_file(Path(config_file)))
    data.update(_read_environment(os.environ if environ is None else environ))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(flags, "flags")
    data.update(flags)
    try:
        return ServerSettings.model_validate(data)
    except ValidationError as error:
        raise SettingsError(str(error)) from error
