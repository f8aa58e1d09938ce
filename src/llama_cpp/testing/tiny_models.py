"""Tiny llama-architecture GGUF models with exactly known behaviour.

The model written by :func:`write_tiny_llama` is a lookup table dressed as a transformer:
one-hot token embeddings, attention and feed-forward weights of zero (so the residual stream
carries the current token unchanged), and an output matrix whose row ``j`` picks out every
token whose successor is ``j``. Greedy decoding therefore walks a successor table chosen by
the test, which makes exact assertions possible on a real GGUF file run by real llama.cpp:
which text comes out, where a multi-byte character is split across tokens, when the
end-of-generation token arrives.

The vocabulary is SentencePiece-style: ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens
``<0x00>``..``<0xFF>``, ``▁`` (a space) and ``<end_of_turn>`` (end of generation, not EOS);
every other text tokenizes to its UTF-8 bytes. With ``TinyModelSpec(fim=True)`` the
fill-in-the-middle control tokens ``<|fim_prefix|>``, ``<|fim_suffix|>`` and ``<|fim_middle|>``
follow (:data:`FIM_PRE_ID`, :data:`FIM_SUF_ID`, :data:`FIM_MID_ID`), and with ``fim_repo=True``
also the repository-level ones ``<|repo_name|>`` and ``<|file_sep|>`` (:data:`FIM_REP_ID`,
:data:`FIM_SEP_ID`, as Qwen2.5-Coder has them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
_FIRST_BYTE_ID = 3
#: SentencePiece's word-boundary piece; a space tokenizes to it and it detokenizes to " ".
SPACE_ID = _FIRST_BYTE_ID + 256
#: An end-of-turn control token: end of generation, but not EOS (as Gemma's <end_of_turn>).
EOT_ID = SPACE_ID + 1
N_VOCAB = EOT_ID + 1
#: Fill-in-the-middle control tokens, after the base vocabulary (``TinyModelSpec(fim=True)``).
FIM_PRE_ID = N_VOCAB
FIM_SUF_ID = N_VOCAB + 1
FIM_MID_ID = N_VOCAB + 2
_FIM_TOKENS = (b"<|fim_prefix|>", b"<|fim_suffix|>", b"<|fim_middle|>")
#: Repository-level FIM tokens, after those (``TinyModelSpec(fim=True, fim_repo=True)``).
FIM_REP_ID = N_VOCAB + 3
FIM_SEP_ID = N_VOCAB + 4
_FIM_REPO_TOKENS = (b"<|repo_name|>", b"<|file_sep|>")


def byte_token(byte: int) -> int:
    """The token id of a single byte."""
    if not 0 <= byte <= 255:
        raise ValueError(f"not a byte: {byte}")
    return _FIRST_BYTE_ID + byte


def chain(text: str, *, then: int = EOS_ID) -> dict[int, int]:
    """Successors that make the byte tokens of ``text`` follow one another, then ``then``.

    Each byte may appear only once in ``text`` (a token has a single successor).
    """
    ids = [byte_token(b) for b in text.encode("utf-8")]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{text!r} repeats a byte; a successor table cannot spell it")
    return dict(zip(ids, [*ids[1:], then], strict=True))


def _default_successors() -> dict[int, int]:
    table: dict[int, int] = {}
    # 'A' starts a walk through two- to four-byte UTF-8 characters, then ends the generation.
    table[byte_token(ord("A"))] = byte_token("é".encode()[0])
    table.update(chain("é😀世界"))
    # 'B' is followed by '!' and then the end-of-turn token: generation ends without EOS.
    table[byte_token(ord("B"))] = byte_token(ord("!"))
    table[byte_token(ord("!"))] = EOT_ID
    # Lowercase letters cycle forever: a generation only ends by length or a stop string.
    letters = "abcdefghijklmnopqrstuvwxyz"
    for a, b in zip(letters, letters[1:] + letters[0], strict=True):
        table[byte_token(ord(a))] = byte_token(ord(b))
    # A space, or the BOS token alone, is followed by 'a' and starts the cycle.
    table[SPACE_ID] = byte_token(ord("a"))
    table[BOS_ID] = byte_token(ord("a"))
    return table


@dataclass(frozen=True, kw_only=True)
class TinyModelSpec:
    """Shape and behaviour of a tiny model.

    Attributes:
        successors: Token id -> next token id under greedy decoding. Tokens not listed are
            followed by ``default_successor``.
        default_successor: Successor of unlisted tokens (default: end of generation).
        n_layer: Transformer blocks.
        n_head: Attention heads (``n_embd`` is the vocabulary size rounded up to a multiple).
        n_embd_min: A wider hidden state: ``n_embd`` is at least this, rounded up the same
            way (the benchmarks' larger models; the extra dimensions stay zero in the
            embedding, so greedy decoding is the same).
        n_ff: Feed-forward width.
        context_length: The model's training context.
        logit_scale: Logit of the successor relative to every other token, per unit of the
            normalised hidden state; larger is more deterministic under sampling.
        noise: Standard deviation of Gaussian noise added to the output matrix, for tests
            that need a non-degenerate distribution.
        seed: Seed of that noise.
        name: ``general.name``.
        fim: Add the fill-in-the-middle control tokens (:data:`FIM_PRE_ID` ...) to the
            vocabulary and name them in the ``tokenizer.ggml.fim_*_token_id`` metadata.
        fim_repo: With ``fim``, also the repository-level tokens (:data:`FIM_REP_ID`,
            :data:`FIM_SEP_ID`).
        add_space_prefix: The tokenizer prepends a space (``▁``) to the text it is given, as
            SentencePiece models such as Code Llama do.
        chat_template: ``tokenizer.chat_template`` (None: the file has none), e.g. a hostile
            one for the template-limit tests.
        tool_use_template: ``tokenizer.chat_template.tool_use``, the template llama.cpp uses
            instead when a request has tools (None: none).
    """

    successors: Mapping[int, int] = field(default_factory=_default_successors)
    default_successor: int = EOS_ID
    n_layer: int = 2
    n_head: int = 4
    n_embd_min: int = 0
    n_ff: int = 64
    context_length: int = 4096
    logit_scale: float = 1.0
    noise: float = 0.0
    seed: int = 0
    name: str = "tiny-successor-llama"
    fim: bool = False
    fim_repo: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None
    tool_use_template: str | None = None

    @property
    def n_vocab(self) -> int:
        return N_VOCAB + len(_fim_tokens(self.fim, self.fim_repo))

    @property
    def n_embd(self) -> int:
        step = self.n_head * 2  # rope wants an even head dimension
        return -(-max(self.n_vocab, self.n_embd_min) // step) * step

    def successor(self, token: int) -> int:
        return self.successors.get(token, self.default_successor)


def _fim_tokens(fim: bool, fim_repo: bool) -> tuple[bytes, ...]:
    if fim_repo and not fim:
        raise ValueError("fim_repo adds to the FIM tokens: it needs fim=True")
    return (_FIM_TOKENS if fim else ()) + (_FIM_REPO_TOKENS if fim_repo else ())


def tiny_vocabulary(
    *, fim: bool = False, fim_repo: bool = False
) -> tuple[list[bytes], list[float], list[int]]:
    """The tiny models' tokens, scores and token types (see the module docstring)."""
    import gguf

    tokens = (
        [b"<unk>", b"<s>", b"</s>"]
        + [f"<0x{b:02X}>".encode() for b in range(256)]
        + ["▁".encode(), b"<end_of_turn>"]
    )
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    types += [int(gguf.TokenType.BYTE)] * 256 + [int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL)]
    extra = _fim_tokens(fim, fim_repo)
    tokens += extra
    types += [int(gguf.TokenType.CONTROL)] * len(extra)
    return tokens, [0.0] * len(tokens), types


def tiny_llama_tensors(spec: TinyModelSpec) -> dict[str, Any]:
    """The tensors of the model of ``spec`` by GGUF name (see the module docstring)."""
    import numpy as np

    n_vocab, n_embd, n_ff = spec.n_vocab, spec.n_embd, spec.n_ff
    embedding = np.zeros((n_vocab, n_embd), dtype=np.float32)
    embedding[np.arange(n_vocab), np.arange(n_vocab)] = 1.0
    output = np.zeros((n_vocab, n_embd), dtype=np.float32)
    for token in range(n_vocab):
        output[spec.successor(token), token] = spec.logit_scale
    if spec.noise > 0:
        rng = np.random.default_rng(spec.seed)
        output += rng.normal(0.0, spec.noise, size=output.shape).astype(np.float32)
    tensors: dict[str, Any] = {
        "token_embd.weight": embedding,
        "output_norm.weight": np.ones(n_embd, dtype=np.float32),
        "output.weight": output,
    }
    zeros = {
        "attn_q.weight": (n_embd, n_embd),
        "attn_k.weight": (n_embd, n_embd),
        "attn_v.weight": (n_embd, n_embd),
        "attn_output.weight": (n_embd, n_embd),
        "ffn_gate.weight": (n_ff, n_embd),
        "ffn_up.weight": (n_ff, n_embd),
        "ffn_down.weight": (n_embd, n_ff),
    }
    for layer in range(spec.n_layer):
        tensors[f"blk.{layer}.attn_norm.weight"] = np.ones(n_embd, dtype=np.float32)
        tensors[f"blk.{layer}.ffn_norm.weight"] = np.ones(n_embd, dtype=np.float32)
        for name, shape in zeros.items():
            tensors[f"blk.{layer}.{name}"] = np.zeros(shape, dtype=np.float32)
    return tensors


def write_tiny_llama(path: str | os.PathLike[str], spec: TinyModelSpec | None = None) -> Path:
    """Write a tiny llama GGUF model to ``path`` and return the path.

    With the default spec, greedy decoding after ``"A"`` yields ``"é😀世界"`` (one byte per
    token) and then ends with EOS; after ``"B"`` it yields ``"!"`` and ends with end-of-turn;
    after a lowercase letter, a space or BOS alone it cycles through the alphabet forever.
    With ``spec.fim`` the model has fill-in-the-middle tokens (see :class:`TinyModelSpec`).
    """
    spec = spec or TinyModelSpec()
    return write_llama_gguf(path, spec, tiny_llama_tensors(spec))


def write_llama_gguf(
    path: str | os.PathLike[str],
    spec: TinyModelSpec,
    tensors: Mapping[str, Any],
    *,
    n_expert: int = 0,
    n_expert_used: int = 0,
) -> Path:
    """Write a llama-architecture GGUF of the tiny vocabulary, the shape of ``spec`` and
    ``tensors`` (with ``n_expert`` > 0, a Mixtral-style MoE) to ``path``; return the path."""
    import gguf

    target = Path(path)
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_name(spec.name)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_layer_norm_rms_eps(1e-6)
    if n_expert > 0:
        writer.add_expert_count(n_expert)
        writer.add_expert_used_count(n_expert_used)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    tokens, scores, types = tiny_vocabulary(fim=spec.fim, fim_repo=spec.fim_repo)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_eot_token_id(EOT_ID)
    if spec.fim:
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, FIM_PRE_ID)
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, FIM_SUF_ID)
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, FIM_MID_ID)
    if spec.fim_repo:
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_REP_ID, FIM_REP_ID)
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_SEP_ID, FIM_SEP_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(spec.add_space_prefix)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)
    if spec.tool_use_template is not None:
        writer.add_string("tokenizer.chat_template.tool_use", spec.tool_use_template)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def write_tiny_lora(
    path: str | os.PathLike[str],
    remap: Mapping[int, int],
    *,
    spec: TinyModelSpec | None = None,
    strength: float = 2.0,
) -> Path:
    """Write a LoRA adapter (GGUF) for the model of ``spec`` that changes successors.

    For each ``token -> new`` in ``remap`` the adapter adds ``strength`` to the output row of
    ``new`` and subtracts it from the row of the base successor, in the column of ``token``
    (a rank-``len(remap)`` update of ``output.weight``). At scale ``s`` the new successor wins
    when ``strength * s > (1 - strength * s)``, i.e. for ``s > 0.25`` with the default strength.
    """
    import gguf
    import numpy as np

    spec = spec or TinyModelSpec()
    rank = len(remap)
    if rank == 0:
        raise ValueError("remap is empty: the adapter would change nothing")
    lora_a = np.zeros((rank, spec.n_embd), dtype=np.float32)
    lora_b = np.zeros((spec.n_vocab, rank), dtype=np.float32)
    for k, (token, new) in enumerate(remap.items()):
        lora_a[k, token] = 1.0
        lora_b[new, k] += strength * spec.logit_scale
        lora_b[spec.successor(token), k] -= strength * spec.logit_scale
    target = Path(path)
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))  # alpha / rank = 1: the scale is the scale
    writer.add_tensor("output.weight.lora_a", lora_a)
    writer.add_tensor("output.weight.lora_b", lora_b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


#: The reranker's separator token (its vocabulary is the tiny llama's plus this one).
SEP_ID = N_VOCAB
_RERANKER_VOCAB = N_VOCAB + 1


def _likes_cats() -> dict[int, float]:
    return {byte_token(ord(c)): 1.0 for c in "cat"}


@dataclass(frozen=True, kw_only=True)
class TinyRerankerSpec:
    """Shape and behaviour of a tiny BERT reranker (see :func:`write_tiny_reranker`).

    Attributes:
        token_weights: Token id -> how much its share of the pair's tokens adds to the score
            (by default the letters of "cat": the more of them, the more relevant).
        labels: ``classifier.output_labels``: one output per label; output ``k`` weighs the
            tokens by ``token_weights`` times ``(-1) ** k``.
        bias: Added to every output.
        gain: Scale of the classification layer before its tanh.
        rerank_template: A ``tokenizer.chat_template.rerank`` with ``{query}`` and
            ``{document}`` placeholders, or None (llama-server then writes BOS query EOS SEP
            document EOS).
        n_head: Attention heads.
        context_length: The model's training context (rows of position embeddings).
        name: ``general.name``.
    """

    token_weights: Mapping[int, float] = field(default_factory=_likes_cats)
    labels: tuple[str, ...] = ("relevant",)
    bias: float = 0.25
    gain: float = 0.125
    rerank_template: str | None = None
    n_head: int = 4
    context_length: int = 512
    name: str = "tiny-bert-reranker"

    @property
    def n_embd(self) -> int:
        return -(-_RERANKER_VOCAB // self.n_head) * self.n_head


_RERANKER_NORM_EPS = 1e-5


def _reranker_heads(spec: TinyRerankerSpec) -> npt.NDArray[np.float32]:
    weights = np.zeros(spec.n_embd, dtype=np.float32)
    for token, weight in spec.token_weights.items():
        weights[token] = weight
    return np.stack([weights * (-1) ** k for k in range(len(spec.labels))]).astype(np.float32)


def tiny_reranker_scores(tokens: Sequence[int], spec: TinyRerankerSpec | None = None) -> list[float]:
    """What the model of ``spec`` outputs for ``tokens`` (one value per label), in numpy.

    The forward pass written out, independently of llama.cpp: one-hot embeddings and layer
    norm; uniform attention (zero queries and keys) that averages the sequence; the first
    token's state through tanh(gain * x) and the label heads.
    """
    spec = spec or TinyRerankerSpec()
    if not tokens:
        raise ValueError("no tokens")

    def layer_norm(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        normed: npt.NDArray[np.float64] = (x - mean) / np.sqrt(var + _RERANKER_NORM_EPS)
        return normed

    embedded = np.zeros((len(tokens), spec.n_embd), dtype=np.float64)
    embedded[np.arange(len(tokens)), list(tokens)] = 1.0
    x = layer_norm(embedded)  # token_embd_norm
    first = layer_norm(x[0] + x.mean(axis=0))  # attention (the sequence mean) + residual, attn_output_norm
    first = layer_norm(first)  # feed-forward of zero + residual, layer_output_norm
    heads = _reranker_heads(spec).astype(np.float64)
    out = heads @ np.tanh(spec.gain * first) + spec.bias
    return [float(v) for v in out]


def write_tiny_reranker(path: str | os.PathLike[str], spec: TinyRerankerSpec | None = None) -> Path:
    """Write a tiny BERT reranker GGUF (pooling type rank) to ``path`` and return the path.

    Its vocabulary is the tiny llama's plus a ``[SEP]`` control token (:data:`SEP_ID`); it
    adds BOS, EOS and SEP as a BERT tokenizer does. One layer: attention with zero queries
    and keys and identity values and output (every token sees the mean of its sequence), a
    feed-forward block of zero, and a classification head ``cls`` (``gain`` times identity,
    then tanh) and ``cls.output`` (the label heads). :func:`tiny_reranker_scores` computes
    the same outputs in numpy.
    """
    import gguf

    spec = spec or TinyRerankerSpec()
    n_embd, n_ff = spec.n_embd, 4
    target = Path(path)
    writer = gguf.GGUFWriter(str(target), "bert")
    writer.add_name(spec.name)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_layer_norm_eps(_RERANKER_NORM_EPS)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_classifier_output_labels(list(spec.labels))
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    tokens, scores, types = tiny_vocabulary()
    writer.add_tokenizer_model("llama")
    writer.add_token_list([*tokens, b"[SEP]"])
    writer.add_token_scores([*scores, 0.0])
    writer.add_token_types([*types, int(gguf.TokenType.CONTROL)])
    writer.add_token_type_count(2)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_sep_token_id(SEP_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.add_add_sep_token(True)
    writer.add_add_space_prefix(False)
    if spec.rerank_template is not None:
        writer.add_string("tokenizer.chat_template.rerank", spec.rerank_template)

    identity = np.eye(n_embd, dtype=np.float32)
    embedding = np.zeros((_RERANKER_VOCAB, n_embd), dtype=np.float32)
    embedding[np.arange(_RERANKER_VOCAB), np.arange(_RERANKER_VOCAB)] = 1.0
    ones, zeros = np.ones(n_embd, dtype=np.float32), np.zeros(n_embd, dtype=np.float32)
    tensors: dict[str, Any] = {
        "token_embd.weight": embedding,
        "position_embd.weight": np.zeros((spec.context_length, n_embd), dtype=np.float32),
        "token_embd_norm.weight": ones,
        "token_embd_norm.bias": zeros,
        "blk.0.attn_q.weight": np.zeros((n_embd, n_embd), dtype=np.float32),
        "blk.0.attn_k.weight": np.zeros((n_embd, n_embd), dtype=np.float32),
        "blk.0.attn_v.weight": identity,
        "blk.0.attn_output.weight": identity,
        "blk.0.attn_output_norm.weight": ones,
        "blk.0.attn_output_norm.bias": zeros,
        "blk.0.ffn_up.weight": np.zeros((n_ff, n_embd), dtype=np.float32),
        "blk.0.ffn_down.weight": np.zeros((n_embd, n_ff), dtype=np.float32),
        "blk.0.layer_output_norm.weight": ones,
        "blk.0.layer_output_norm.bias": zeros,
        "cls.weight": identity * np.float32(spec.gain),
        "cls.output.weight": _reranker_heads(spec),
        "cls.output.bias": np.full(len(spec.labels), spec.bias, dtype=np.float32),
    }
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
