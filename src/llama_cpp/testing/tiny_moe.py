"""A tiny Mixture-of-Experts GGUF model whose expert routing is known exactly.

:func:`write_tiny_moe` writes the tiny llama of :mod:`llama_cpp.testing.tiny_models` (the
same vocabulary and successor table) with a Mixtral-style MoE feed-forward block in every
layer: a router ``ffn_gate_inp`` of seeded random weights, ``n_expert`` experts of which
``n_expert_used`` run per token. With ``expert_scale=0`` (the default) the experts' weights
are zero, so the residual stream stays the one-hot embedding of the current token in every
layer: the router then picks, in layer ``l`` for token ``t``, the ``n_expert_used`` experts
with the largest weights in column ``t`` of that layer's router, which
:func:`tiny_moe_experts` computes in numpy. Greedy decoding walks the successor table as the
dense tiny llama does. With ``expert_scale > 0`` the experts have random weights of that
scale: outputs then depend on the experts' computation (for placement and RPC tests), and
only the first layer's routing is known in advance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from llama_cpp.testing.tiny_models import TinyModelSpec, tiny_llama_tensors, write_llama_gguf


@dataclass(frozen=True, kw_only=True)
class TinyMoeSpec(TinyModelSpec):
    """Shape and behaviour of a tiny MoE model (:class:`TinyModelSpec`'s fields, plus these).

    Attributes:
        n_expert: Experts per layer.
        n_expert_used: Experts each token is routed to (top-k).
        expert_scale: Standard deviation of the experts' random weights; 0 keeps the
            residual stream one-hot and the routing exactly known.
        router_seed: Seed of the routers' (and experts') random weights.
        expert_dtype: The experts' storage, ``"float32"`` or ``"float16"`` (F16 tensors:
            half the file of a large benchmark model).
    """

    n_layer: int = 4
    n_ff: int = 32
    n_expert: int = 8
    n_expert_used: int = 2
    expert_scale: float = 0.0
    router_seed: int = 0
    expert_dtype: Literal["float32", "float16"] = "float32"
    name: str = "tiny-successor-moe"

    def __post_init__(self) -> None:
        if not 1 <= self.n_expert_used <= self.n_expert:
            raise ValueError(f"n_expert_used must be in 1..{self.n_expert}, got {self.n_expert_used}")
        if self.expert_dtype not in ("float32", "float16"):
            raise ValueError(f"expert_dtype must be 'float32' or 'float16', got {self.expert_dtype!r}")


def _routers(spec: TinyMoeSpec) -> npt.NDArray[np.float32]:
    """Router weights, shape ``(n_layer, n_expert, n_embd)``."""
    rng = np.random.default_rng(spec.router_seed)
    return rng.normal(0.0, 1.0, size=(spec.n_layer, spec.n_expert, spec.n_embd)).astype(np.float32)


def tiny_moe_experts(token: int, spec: TinyMoeSpec | None = None, *, k: int | None = None) -> list[set[int]]:
    """The experts each layer routes ``token`` to (a set per layer), for ``expert_scale=0``.

    The residual stream is then one-hot at every layer, and RMS normalisation scales it by
    a positive constant, so the router's logits are column ``token`` of its weights (times
    that constant) and the top-k are the largest entries of that column.

    Args:
        token: The token id.
        spec: The model's spec (default: :class:`TinyMoeSpec`'s).
        k: The top-k (default: ``spec.n_expert_used``; another value for a model loaded with
            a ``kv_overrides`` of ``llama.expert_used_count``).
    """
    spec = spec or TinyMoeSpec()
    if spec.expert_scale != 0:
        raise ValueError("routing is known in advance only with expert_scale=0")
    top = spec.n_expert_used if k is None else k
    if not 1 <= top <= spec.n_expert:
        raise ValueError(f"k must be in 1..{spec.n_expert}, got {top}")
    columns = _routers(spec)[:, :, token]
    return [{int(e) for e in np.argsort(-column)[:top]} for column in columns]


def _tensors(spec: TinyMoeSpec) -> dict[str, Any]:
    """The tiny llama's tensors with each layer's dense feed-forward block replaced by the
    router and the experts."""
    n_embd, n_ff, n_expert = spec.n_embd, spec.n_ff, spec.n_expert
    tensors = tiny_llama_tensors(spec)
    routers = _routers(spec)
    rng = np.random.default_rng(spec.router_seed + 1)

    def experts(*shape: int) -> npt.NDArray[np.floating[Any]]:
        if spec.expert_scale == 0:
            return np.zeros(shape, dtype=spec.expert_dtype)
        return rng.normal(0.0, spec.expert_scale, size=shape).astype(spec.expert_dtype)

    for layer in range(spec.n_layer):
        blk = f"blk.{layer}"
        for name in ("ffn_gate", "ffn_up", "ffn_down"):
            del tensors[f"{blk}.{name}.weight"]
        # numpy shapes are ggml's dimensions reversed: ffn_gate_exps is {n_embd, n_ff, n_expert}.
        tensors[f"{blk}.ffn_gate_inp.weight"] = routers[layer]
        tensors[f"{blk}.ffn_gate_exps.weight"] = experts(n_expert, n_ff, n_embd)
        tensors[f"{blk}.ffn_up_exps.weight"] = experts(n_expert, n_ff, n_embd)
        tensors[f"{blk}.ffn_down_exps.weight"] = experts(n_expert, n_embd, n_ff)
    return tensors


def write_tiny_moe(path: str | os.PathLike[str], spec: TinyMoeSpec | None = None) -> Path:
    """Write a tiny MoE GGUF model (llama architecture, Mixtral-style experts) to ``path``.

    See the module docstring for what it computes; :func:`tiny_moe_experts` gives its routing.
    """
    spec = spec or TinyMoeSpec()
    return write_llama_gguf(
        path, spec, _tensors(spec), n_expert=spec.n_expert, n_expert_used=spec.n_expert_used
    )
