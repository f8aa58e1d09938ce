"""Sampling settings: :class:`SamplingParams`, a frozen, validated-at-use value object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from llama_cpp import _core
from llama_cpp.errors import InvalidArgumentError
from llama_cpp.grammar import LlamaGrammar

#: A random seed is drawn for each generation when ``seed`` is this value (or None).
DEFAULT_SEED: int = _core.DEFAULT_SEED

_FLOAT = "a float"
_INT32 = "an int in [-2**31, 2**31)"
#: The fields copied as they are into the native config, with what it can hold.
_NATIVE_FIELDS: dict[str, str] = {
    "temperature": _FLOAT,
    "top_k": _INT32,
    "top_p": _FLOAT,
    "min_p": _FLOAT,
    "typical_p": _FLOAT,
    "repeat_penalty": _FLOAT,
    "frequency_penalty": _FLOAT,
    "presence_penalty": _FLOAT,
    "penalty_last_n": _INT32,
    "mirostat_mode": _INT32,
    "mirostat_tau": _FLOAT,
    "mirostat_eta": _FLOAT,
    "dry_multiplier": _FLOAT,
    "dry_base": _FLOAT,
    "dry_allowed_length": _INT32,
    "dry_penalty_last_n": _INT32,
    "dry_sequence_breakers": "a sequence of str",
    "xtc_probability": _FLOAT,
    "xtc_threshold": _FLOAT,
    "top_n_sigma": _FLOAT,
}


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How the next token is chosen; defaults are llama-cpp-python's (llama-server's for DRY,
    XTC and top-n-sigma, which are off by default).

    The samplers run in llama-server's order: logit bias, penalties, DRY, grammar, then
    top-n-sigma, top-k, typical, top-p, min-p, XTC, temperature and the random draw. With
    ``temperature == 0`` only the logit bias, penalties, DRY and grammar apply before the
    argmax.

    ``temperature == 0`` is greedy decoding, ``temperature < 0`` samples from the unmodified
    distribution. Values are checked when a generation starts: an out-of-range value raises
    :class:`llama_cpp.InvalidArgumentError` naming the field.

    Attributes:
        temperature: Softmax temperature.
        top_k: Keep the k most likely tokens (0 keeps all).
        top_p: Nucleus sampling threshold (1.0 disables it).
        min_p: Drop tokens below ``min_p`` times the top probability (0 disables it).
        typical_p: Locally typical sampling (1.0 disables it).
        repeat_penalty: Penalty for tokens in the last ``penalty_last_n`` (1.0 disables it).
        frequency_penalty: OpenAI-style frequency penalty.
        presence_penalty: OpenAI-style presence penalty.
        penalty_last_n: Window of the penalties (-1: the whole context).
        mirostat_mode: 0 off, 1 Mirostat, 2 Mirostat 2.0.
        mirostat_tau: Mirostat target entropy.
        mirostat_eta: Mirostat learning rate.
        dry_multiplier: DRY ("don't repeat yourself") strength: a token that would extend a
            repetition longer than ``dry_allowed_length`` loses
            ``dry_multiplier * dry_base ** (length - dry_allowed_length)`` logits (0 disables it).
        dry_base: Growth of the DRY penalty with the repetition's length (>= 1).
        dry_allowed_length: Repetitions up to this many tokens go unpenalized.
        dry_penalty_last_n: Tokens DRY scans for repetitions (-1: the context, 0 disables it).
        dry_sequence_breakers: Strings that end a repetition for DRY.
        xtc_probability: XTC ("exclude top choices"): the chance, per token, of dropping every
            token above ``xtc_threshold`` except the least likely of them (0 disables it).
        xtc_threshold: Probability above which XTC drops tokens (above 0.5 it never acts).
        top_n_sigma: Keep the tokens whose logit is within ``top_n_sigma`` standard deviations
            of the top one (<= 0 disables it).
        seed: Sampler seed; None draws a random one.
        logit_bias: Token id to additive logit bias (``-inf`` bans a token).
        grammar: A GBNF grammar that every generated token must satisfy.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", '"', "*")
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    top_n_sigma: float = -1.0
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: LlamaGrammar | None = None

    @classmethod
    def greedy(cls) -> SamplingParams:
        """Deterministic decoding: always the most likely token."""
        return cls(temperature=0.0)

    def to_native(self) -> _core.SamplerConfig:
        """The native form.

        Raises:
            InvalidArgumentError: A value the native config cannot hold (a float that is not a
                number, an int beyond 32 bits, a logit bias that is not token id -> number) or
                a seed out of range; the other ranges are checked when a generation starts.
        """
        config = _core.SamplerConfig()
        for name, holds in _NATIVE_FIELDS.items():
            value = getattr(self, name)
            try:
                setattr(config, name, list(value) if isinstance(value, tuple) else value)
            except TypeError:
                # nanobind's message ("incompatible function arguments") names no field.
                raise InvalidArgumentError(f"{name} must be {holds}, got {value!r}") from None
        if self.seed is None or self.seed == -1:
            config.seed = DEFAULT_SEED
        elif isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= 0xFFFFFFFF:
            config.seed = self.seed
        else:
            raise InvalidArgumentError(f"seed must be in [0, 2**32) or None, got {self.seed!r}")
        try:
            config.logit_bias = [(int(token), float(bias)) for token, bias in self.logit_bias.items()]
        except (TypeError, ValueError, OverflowError, AttributeError):
            raise InvalidArgumentError(
                f"logit_bias must map token ids (int32) to numbers, got {self.logit_bias!r}"
            ) from None
        if self.grammar is not None:
            config.grammar = self.grammar.grammar
            config.grammar_root = self.grammar.root
            config.grammar_lazy = self.grammar.lazy
            config.grammar_trigger_patterns = list(self.grammar.trigger_patterns)
            config.grammar_trigger_tokens = list(self.grammar.trigger_tokens)
            config.grammar_prefill = list(self.grammar.prefill_tokens)
        return config
