"""Crafted metadata for the loader fuzzer: a GGUF file parsed, edited and written back.

The edits are the ones a careless converter or a hostile file makes: duplicate tokens, token
arrays whose lengths disagree, malformed merges, special token ids out of range, absurd
hyperparameters, known keys with the wrong value type, unknown GGML types, tensor extents past
the end of the file, bad alignments. The file is written here rather than with
``gguf.GGUFWriter``, which refuses several of these on purpose (empty arrays, mixed types).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRING, ARRAY = 8, 9
UINT32, INT32, FLOAT32, BOOL, UINT64, INT64 = 4, 5, 6, 7, 10, 11
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class Tensor:
    name: bytes
    dims: list[int]
    ggml_type: int
    offset: int  # relative to the start of the data section


@dataclass
class Gguf:
    """A GGUF file as values: ``kv`` maps a key to (type, value); an array's value is
    (element type, list). ``data`` is the data section (None: left sparse, ``data_size``
    zero bytes)."""

    version: int
    kv: dict[bytes, tuple[int, Any]]
    tensors: list[Tensor]
    data: bytes | None
    data_size: int
    alignment_override: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse(path: Path) -> Gguf:
    """Parse the well-formed GGUF file at ``path`` (its data is kept only below 64 MiB)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(size if size < (64 << 20) else (16 << 20))
    pos = 4

    def take(fmt: str) -> Any:  # noqa: ANN401 - a value of the format's type
        nonlocal pos
        (v,) = struct.unpack_from(fmt, raw, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> bytes:
        nonlocal pos
        n = take("<Q")
        pos += n
        return raw[pos - n : pos]

    def value(vtype: int) -> Any:  # noqa: ANN401 - a value of the GGUF type
        if vtype == STRING:
            return string()
        if vtype == ARRAY:
            etype, n = take("<I"), take("<Q")
            return (etype, [value(etype) for _ in range(n)])
        return take(_FMT[vtype])

    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    kv: dict[bytes, tuple[int, Any]] = {}
    for _ in range(n_kv):
        key = string()
        vtype = take("<I")
        kv[key] = (vtype, value(vtype))
    tensors = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        tensors.append(Tensor(name, dims, take("<I"), take("<Q")))
    alignment = kv.get(b"general.alignment", (UINT32, 32))[1]
    start = -(-pos // alignment) * alignment
    data = raw[start:] if size < (64 << 20) else None
    return Gguf(version, kv, tensors, data, size - start)


def _pack(vtype: int, value: Any) -> bytes:  # noqa: ANN401 - a value of the GGUF type
    if vtype == STRING:
        return struct.pack("<Q", len(value)) + bytes(value)
    if vtype == ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_pack(etype, v) for v in items)
    return struct.pack(_FMT[vtype], value)


def write(g: Gguf, path: Path) -> Path:
    """Write ``g`` to ``path`` (the data section padded to the file's alignment)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", g.version, len(g.tensors), len(g.kv)))
    for key, (vtype, value) in g.kv.items():
        out += _pack(STRING, key) + struct.pack("<I", vtype) + _pack(vtype, value)
    for t in g.tensors:
        out += _pack(STRING, t.name) + struct.pack("<I", len(t.dims))
        out += b"".join(struct.pack("<Q", d) for d in t.dims) + struct.pack("<IQ", t.ggml_type, t.offset)
    alignment = g.kv.get(b"general.alignment", (UINT32, 32))[1]
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        alignment = 32  # what a loader accepting the file would have to assume
    out += bytes(-len(out) % alignment)
    with path.open("wb") as f:
        f.write(out)
        if g.data is not None:
            f.write(g.data)
        else:
            f.truncate(len(out) + g.data_size)
    return path


# ------------------------------------------------------------------------------------------
# The edits: each takes the parsed file and a random source, and edits the file in place.
# ------------------------------------------------------------------------------------------

_Edit = Callable[[Gguf, random.Random], None]


def _tokens(g: Gguf) -> list[bytes]:
    tokens: list[bytes] = g.kv[b"tokenizer.ggml.tokens"][1][1]
    return tokens


def _arch(g: Gguf) -> bytes:
    arch: bytes = g.kv.get(b"general.architecture", (STRING, b"llama"))[1]
    return arch


def _duplicate_token(g: Gguf, rng: random.Random) -> None:
    tokens = _tokens(g)
    i, j = rng.sample(range(len(tokens)), 2)
    tokens[j] = tokens[i]


def _resize_token_array(g: Gguf, rng: random.Random) -> None:
    keys = [
        k
        for k in (b"tokenizer.ggml.scores", b"tokenizer.ggml.token_type", b"tokenizer.ggml.tokens")
        if k in g.kv
    ]
    key = rng.choice(keys)
    _, (etype, items) = g.kv[key]
    n = len(items)
    new_n = rng.choice([0, 1, n - 1, n + 1, n // 2, 2 * n])
    filler = items[-1] if items else (b"x" if etype == STRING else 0)
    if new_n > n and etype == STRING:
        items.extend(b"<extra_%d>" % i for i in range(new_n - n))
    else:
        del items[new_n:]
        items.extend([filler] * max(0, new_n - len(items)))


def _bad_token_types(g: Gguf, rng: random.Random) -> None:
    if b"tokenizer.ggml.token_type" not in g.kv:
        g.kv[b"tokenizer.ggml.token_type"] = (ARRAY, (INT32, [1] * len(_tokens(g))))
    items = g.kv[b"tokenizer.ggml.token_type"][1][1]
    for _ in range(rng.randint(1, 8)):
        items[rng.randrange(len(items))] = rng.choice([-1, 0, 7, 99, 2**31 - 1, -(2**31)])


def _bad_merges(g: Gguf, rng: random.Random) -> None:
    merges = g.kv.get(b"tokenizer.ggml.merges", (ARRAY, (STRING, [])))[1][1]
    tokens = _tokens(g)
    bad = [
        b"",
        b" ",
        b"nospace",
        b"a b c",
        b"zzqq xxyy",
        b"\xff\xfe \xfd",
        b" a",
        b"a ",
        tokens[0] + b" " + tokens[-1],
    ]
    if not merges:
        merges.extend(rng.sample(bad, 3))
    for _ in range(rng.randint(1, 6)):
        merges[rng.randrange(len(merges))] = rng.choice(bad)
    g.kv[b"tokenizer.ggml.merges"] = (ARRAY, (STRING, merges))


_SPECIAL_KEYS = [
    b"tokenizer.ggml.bos_token_id",
    b"tokenizer.ggml.eos_token_id",
    b"tokenizer.ggml.unknown_token_id",
    b"tokenizer.ggml.padding_token_id",
    b"tokenizer.ggml.seperator_token_id",
    b"tokenizer.ggml.eot_token_id",
    b"tokenizer.ggml.eom_token_id",
    b"tokenizer.ggml.mask_token_id",
    b"tokenizer.ggml.fim_pre_token_id",
    b"tokenizer.ggml.fim_suf_token_id",
    b"tokenizer.ggml.fim_mid_token_id",
    b"tokenizer.ggml.fim_pad_token_id",
]


def _special_out_of_range(g: Gguf, rng: random.Random) -> None:
    n = len(_tokens(g))
    key = rng.choice(_SPECIAL_KEYS)
    g.kv[key] = (UINT32, rng.choice([n, n + 1, 2**31 - 1, 2**31, 2**32 - 1]))


_HPARAMS = [
    b"context_length",
    b"embedding_length",
    b"block_count",
    b"feed_forward_length",
    b"attention.head_count",
    b"attention.head_count_kv",
    b"rope.dimension_count",
    b"expert_count",
    b"expert_used_count",
    b"attention.key_length",
    b"attention.value_length",
    b"vocab_size",
    b"attention.sliding_window",
]


def _absurd_hparam(g: Gguf, rng: random.Random) -> None:
    key = _arch(g) + b"." + rng.choice(_HPARAMS)
    value = rng.choice([0, 1, 3, 255, 256, 513, 2**16, 2**31 - 1, 2**31, 2**32 - 1])
    g.kv[key] = (UINT32, value)


def _hparam_array(g: Gguf, rng: random.Random) -> None:
    """A per-layer array (head counts, feed-forward sizes) of the wrong length or values."""
    key = (
        _arch(g)
        + b"."
        + rng.choice([b"attention.head_count", b"attention.head_count_kv", b"feed_forward_length"])
    )
    n_layer = g.kv.get(_arch(g) + b".block_count", (UINT32, 1))[1]
    length = rng.choice([0, 1, max(0, n_layer - 1), n_layer + 1, 600])
    g.kv[key] = (ARRAY, (UINT32, [rng.choice([0, 1, 2, 2**31]) for _ in range(length)]))


def _wrong_type(g: Gguf, rng: random.Random) -> None:
    keys = [k for k in g.kv if k != b"general.architecture"] + [b"general.architecture"]
    key = rng.choice(keys)
    g.kv[key] = rng.choice(
        [
            (STRING, b"not a number"),
            (FLOAT32, 1.5),
            (BOOL, True),
            (INT32, -1),
            (UINT64, 2**63),
            (ARRAY, (UINT32, [1, 2, 3])),
            (ARRAY, (STRING, [b"a", b"b"])),
            (ARRAY, (ARRAY, [(UINT32, [1])])),
            (ARRAY, (UINT32, [])),
        ]
    )


def _drop_key(g: Gguf, rng: random.Random) -> None:
    del g.kv[rng.choice(list(g.kv))]


def _huge_string(g: Gguf, rng: random.Random) -> None:
    blob = bytes(rng.randrange(256) for _ in range(64)) * rng.choice([1, 1024, 16384])
    target = rng.choice(["key", "value", "token", "arch"])
    if target == "key":
        g.kv[blob] = (UINT32, 1)
    elif target == "token":
        tokens = _tokens(g)
        tokens[rng.randrange(len(tokens))] = blob
    elif target == "arch":
        g.kv[b"general.architecture"] = (STRING, blob[:200])
    else:
        g.kv[b"tokenizer.ggml.model"] = (STRING, blob)


def _empty_vocab(g: Gguf, rng: random.Random) -> None:
    for key in (b"tokenizer.ggml.tokens", b"tokenizer.ggml.scores", b"tokenizer.ggml.token_type"):
        if key in g.kv:
            etype = g.kv[key][1][0]
            g.kv[key] = (ARRAY, (etype, []))


def _unknown_tokenizer(g: Gguf, rng: random.Random) -> None:
    g.kv[b"tokenizer.ggml.model"] = (
        STRING,
        rng.choice([b"", b"xyz", b"gpt2", b"llama", b"bert", b"t5", b"rwkv", b"ugm"]),
    )
    if rng.random() < 0.5:
        g.kv[b"tokenizer.ggml.pre"] = (
            STRING,
            rng.choice([b"", b"nonsense", b"llama3", b"gpt-2", b"default"]),
        )


def _alignment(g: Gguf, rng: random.Random) -> None:
    g.kv[b"general.alignment"] = (UINT32, rng.choice([0, 1, 3, 7, 24, 64, 2**31, 2**32 - 1]))


def _tensor_edit(g: Gguf, rng: random.Random) -> None:
    if not g.tensors:
        return
    t = rng.choice(g.tensors)
    what = rng.choice(["type", "n_dims", "dim", "dim0", "offset", "misalign", "dup_name", "rename", "drop"])
    if what == "type":
        t.ggml_type = rng.choice([4, 5, 31, 39, 40, 41, 100, 2**31, 2**32 - 1])
    elif what == "n_dims":
        t.dims = t.dims + [1] * rng.choice([1, 2, 3, 60])
    elif what == "dim":
        t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 3, 2**31, 2**32, 2**62, 2**64 - 1])
    elif what == "dim0":
        t.dims[0] = t.dims[0] + rng.choice([1, 32, -1])
    elif what == "offset":
        t.offset = rng.choice([g.data_size, g.data_size - 32, 2**40, 2**64 - 32])
    elif what == "misalign":
        t.offset += rng.choice([1, 4, 16])
    elif what == "dup_name":
        t.name = rng.choice(g.tensors).name
    elif what == "rename":
        t.name = rng.choice([b"", b"x" * 70, b"blk.999.attn_q.weight", b"token_embd.weight\x00x"])
    else:
        g.tensors.remove(t)


def _version(g: Gguf, rng: random.Random) -> None:
    g.version = rng.choice([0, 1, 2, 4, 2**31])


CRAFTS: dict[str, _Edit] = {
    "duplicate_token": _duplicate_token,
    "resize_token_array": _resize_token_array,
    "bad_token_types": _bad_token_types,
    "bad_merges": _bad_merges,
    "special_out_of_range": _special_out_of_range,
    "absurd_hparam": _absurd_hparam,
    "hparam_array": _hparam_array,
    "wrong_type": _wrong_type,
    "drop_key": _drop_key,
    "huge_string": _huge_string,
    "empty_vocab": _empty_vocab,
    "unknown_tokenizer": _unknown_tokenizer,
    "alignment": _alignment,
    "tensor_edit": _tensor_edit,
    "version": _version,
}


@functools.lru_cache(maxsize=4)
def _parsed(source: Path, mtime_ns: int) -> Gguf:
    return parse(source)


def _fresh(source: Path) -> Gguf:
    """A parse of ``source`` that the caller may edit: a copy of a cached parse (the arrays
    and tensor infos copied, the rest shared), since parsing a 262k-token vocabulary in
    Python takes seconds."""
    g = _parsed(source, source.stat().st_mtime_ns)
    kv = {k: (t, (v[0], list(v[1])) if t == ARRAY else v) for k, (t, v) in g.kv.items()}
    tensors = [dataclasses.replace(t, dims=list(t.dims)) for t in g.tensors]
    return Gguf(g.version, kv, tensors, g.data, g.data_size)


def patch(source: Path, target: Path, what: str, *args: Any) -> Path:
    """Write ``source`` with one explicit edit to ``target``: the recipes of the regression
    corpus, which must not depend on how :data:`CRAFTS` draw their edits.

    ``what`` is ``token`` (args: index, new text as hex, optionally repeated this many
    times), ``empty_vocab`` (no args), ``vocab_size`` (args: how many tokens to keep, with
    their scores and types), ``kv_string`` (args: key, new string value as hex) or
    ``kv_uint32`` (args: key, value).
    """
    g = _fresh(source)
    if what == "token":
        _tokens(g)[int(args[0])] = bytes.fromhex(args[1]) * (int(args[2]) if len(args) > 2 else 1)
    elif what == "empty_vocab":
        _empty_vocab(g, random.Random(0))
    elif what == "kv_string":
        g.kv[args[0].encode()] = (STRING, bytes.fromhex(args[1]))
    elif what == "kv_uint32":
        g.kv[args[0].encode()] = (UINT32, int(args[1]))
    elif what == "vocab_size":
        for key in (b"tokenizer.ggml.tokens", b"tokenizer.ggml.scores", b"tokenizer.ggml.token_type"):
            if key in g.kv:
                del g.kv[key][1][1][int(args[0]) :]
    else:
        raise ValueError(f"unknown patch: {what}")
    return write(g, target)


def craft(source: Path, target: Path, name: str, rng: random.Random) -> Path:
    """Write ``source`` edited by the craft ``name`` (drawing from ``rng``) to ``target``."""
    g = _fresh(source)
    CRAFTS[name](g, rng)
    return write(g, target)
