"""Where a model's tensors go and how much memory they take: tensor overrides, fitting to free
device memory (:func:`plan_fit`, :class:`FitPlan`), llama.cpp's memory accounting and NUMA.

The options themselves are :class:`~llama_cpp.LlamaConfig` fields (``tensor_overrides``,
``cpu_moe``, ``n_cpu_moe``, ``fit``, ``fit_margin``, ``fit_min_ctx``, ``numa``); this module
turns them into what llama.cpp is given, once per load, for :class:`~llama_cpp.Llama` and
:class:`~llama_cpp.LlamaPool` alike.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Literal

from llama_cpp import _core
from llama_cpp.config import LlamaConfig, parse_tensor_overrides, resolve_config

__all__ = ["DeviceMemory", "FitPlan", "MemoryBreakdown", "parse_tensor_overrides", "plan_fit"]

_log = logging.getLogger("llama_cpp")

#: ``{device name: {"model": bytes, "context": bytes, "compute": bytes}}``: llama.cpp's own
#: accounting (``llama_get_memory_breakdown``) of a context and its model. Every device the
#: model uses is a key, and ``"CPU"`` (host memory: mapped files and pinned buffers too).
MemoryBreakdown = dict[str, dict[str, int]]

_MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class DeviceMemory:
    """One device's memory as llama.cpp projects it for a plan (bytes).

    Attributes:
        name: The device (``"CPU"``: host memory, always last).
        free: Free memory when the plan was made.
        total: The device's memory.
        model: Weights projected on it.
        context: KV cache (and recurrent state) projected on it.
        compute: Compute buffers projected on it.
    """

    name: str
    free: int
    total: int
    model: int
    context: int
    compute: int

    @property
    def used(self) -> int:
        """``model + context + compute``."""
        return self.model + self.context + self.compute


@dataclass(frozen=True, kw_only=True)
class FitPlan:
    """What llama.cpp's ``common_fit_params`` chose for a model, and why.

    It changes only what was left to it: ``n_gpu_layers`` (0 or -1), ``tensor_split`` and
    tensor overrides when none were given, and ``n_ctx`` when it was 0.

    Attributes:
        status: ``"success"`` (projected to fit) or ``"failure"`` (no placement found; the
            parameters are the last it tried, and a load may still fail).
        n_gpu_layers: Layers to offload (-1: all).
        n_ctx: The context window (per sequence for a pool).
        tensor_split: Proportion per device (empty: llama.cpp's default).
        tensor_overrides: ``(regex, device)`` pairs to load with: those given, or the expert
            tensors the fit moved to host memory.
        devices: Projected memory per device with these parameters (host memory last).
        margin: Bytes each device was to keep free.
        n_layer: The model's layers.
        n_ctx_train: The model's training context.
        n_expert: Experts per MoE layer (0: dense).
        reason: What was decided and why, in words.
    """

    status: Literal["success", "failure"]
    n_gpu_layers: int
    n_ctx: int
    tensor_split: tuple[float, ...]
    tensor_overrides: tuple[tuple[str, str], ...]
    devices: tuple[DeviceMemory, ...]
    margin: int
    n_layer: int
    n_ctx_train: int
    n_expert: int
    reason: str

    def apply(self, config: LlamaConfig) -> LlamaConfig:
        """``config`` with this plan's choices (and ``fit`` off: it is done)."""
        return replace(
            config,
            n_gpu_layers=self.n_gpu_layers,
            n_ctx=self.n_ctx,
            tensor_split=self.tensor_split or config.tensor_split,
            tensor_overrides=self.tensor_overrides,
            cpu_moe=False,
            n_cpu_moe=0,
            fit=False,
        )


def plan_fit(
    model_path: str | os.PathLike[str], *, config: LlamaConfig | None = None, **options: Any
) -> FitPlan:
    """Plan, without loading, what ``Llama(model_path, fit=True, ...)`` would load with.

    llama.cpp loads the model's metadata without allocating anything, measures what each
    device would hold, and lowers the context (when ``n_ctx=0``), then moves layers and
    expert tensors off the accelerators until each keeps ``fit_margin`` bytes free. Without
    an accelerator only the context size is chosen. One plan runs at a time in a process.

    Args:
        model_path: A GGUF file.
        config: Settings as a :class:`LlamaConfig`; ``options`` are set over it.
        **options: :class:`~llama_cpp.Llama`'s keywords (``n_ctx``, ``n_gpu_layers``,
            ``rpc_servers``, ``tensor_overrides``, ``fit_margin``, ``fit_min_ctx``, ...).

    Returns:
        The :class:`FitPlan`.

    Raises:
        TypeError: An unknown keyword.
        InvalidArgumentError: A bad option (an invalid regex, an unknown device, ...).
        ModelLoadError: The file is missing or llama.cpp cannot read the model.
    """
    return _plan(os.fspath(model_path), resolve_config("plan_fit", config, options), n_seq=1)


def prepare_load(
    model_path: str, config: LlamaConfig, *, n_seq: int = 1
) -> tuple[LlamaConfig, FitPlan | None]:
    """What a constructor does before loading: set the process's NUMA strategy, and fit when
    ``config.fit`` is set. Returns the config to load with and the plan (None without ``fit``).

    Args:
        model_path: The GGUF file.
        config: The constructor's settings.
        n_seq: Sequences of the context (a pool's size); ``n_ctx`` is per sequence then.

    Raises:
        InvalidArgumentError: A NUMA strategy other than the one already set, or a bad option.
        ModelLoadError: The model cannot be read.
    """
    strategy = config.numa_strategy()
    if strategy is not None:
        _core.numa_init(strategy)
    if not config.fit:
        return config, None
    plan = _plan(model_path, config, n_seq=n_seq)
    log = _log.warning if plan.status == "failure" else _log.info
    log("fit %s: %s", model_path, plan.reason)
    return plan.apply(config), plan


def _plan(model_path: str, config: LlamaConfig, *, n_seq: int) -> FitPlan:
    model = config.model_options()
    if config.n_gpu_layers == 0:
        model.n_gpu_layers = -1  # llama.cpp's "auto": the fit chooses
    context = config.context_options()
    if n_seq > 1:  # as LlamaPool creates its engine: n_seq sequences of n_ctx each
        context.n_ctx = config.n_ctx * n_seq
        context.n_seq_max = n_seq
    # The smallest context the fit may lower to: llama.cpp's fit multiplies it by the number
    # of streams itself (one per sequence unless the cache is unified).
    n_ctx_min = config.fit_min_ctx * n_seq if config.kv_unified else config.fit_min_ctx
    result = _core.fit_params(model_path, model, context, config.fit_margin, n_ctx_min)
    status: Literal["success", "failure"] = "success" if result.status == 0 else "failure"
    devices = tuple(
        DeviceMemory(
            name=d.name, free=d.free, total=d.total, model=d.model, context=d.context, compute=d.compute
        )
        for d in result.devices
    )
    n_ctx = result.n_ctx // n_seq
    plan = FitPlan(
        status=status,
        n_gpu_layers=result.n_gpu_layers,
        n_ctx=n_ctx,
        tensor_split=tuple(result.tensor_split),
        tensor_overrides=tuple(result.tensor_overrides),
        devices=devices,
        margin=config.fit_margin,
        n_layer=result.n_layer,
        n_ctx_train=result.n_ctx_train,
        n_expert=result.n_expert,
        reason="",
    )
    return replace(plan, reason=_reason(plan, config, n_seq, given_overrides=len(model.tensor_overrides) > 0))


def _reason(plan: FitPlan, config: LlamaConfig, n_seq: int, *, given_overrides: bool) -> str:
    accelerators = [d for d in plan.devices if d.name != "CPU"]
    parts: list[str] = []
    if plan.status == "failure":
        parts.append(
            f"no placement is projected to keep {plan.margin // _MiB} MiB free on every device "
            "(llama.cpp changes only what is left to it: n_gpu_layers 0 or -1, no tensor_split, "
            "no tensor overrides, n_ctx=0)"
        )
    elif not accelerators:
        parts.append("no accelerator device: the model stays in host memory")
    else:
        where = ", ".join(f"{d.name} {d.used // _MiB} of {d.free // _MiB} MiB free" for d in accelerators)
        parts.append(f"projected use {where} (keeping {plan.margin // _MiB} MiB free each)")
        layers = "all" if plan.n_gpu_layers < 0 else str(plan.n_gpu_layers)
        parts.append(f"{layers} of {plan.n_layer} layers offloaded")
        if plan.tensor_overrides and not given_overrides:
            by_device: dict[str, int] = {}
            for _, device in plan.tensor_overrides:
                by_device[device] = by_device.get(device, 0) + 1
            placed = ", ".join(f"{n} on {device}" for device, n in by_device.items())
            parts.append(f"tensor overrides place what does not fit by layer: {placed}")
    if config.n_ctx == 0:
        each = f" for each of {n_seq} sequences" if n_seq > 1 else ""
        # A unified cache is one window shared by the sequences; otherwise each has its own.
        window = plan.n_ctx * n_seq if config.kv_unified else plan.n_ctx
        if window >= plan.n_ctx_train:
            parts.append(f"n_ctx={plan.n_ctx}{each}: the training context")
        else:
            parts.append(
                f"n_ctx={plan.n_ctx}{each}: lowered from the training context {plan.n_ctx_train} to fit"
            )
    else:
        parts.append(f"n_ctx={plan.n_ctx} as given")
    return "; ".join(parts)
