"""Fuzzing the model loader with hostile GGUF files, every case in a worker subprocess.

A case is a *recipe*: a base file (the tiny models of :mod:`llama_cpp.testing`, llama.cpp's
``ggml-vocab-*.gguf`` files, the default model's metadata) and one mutation (a truncation, a
byte flip, or crafted metadata written with the ``gguf`` package). :func:`make_cases` draws
them from a seed, so that a failing case is reproduced from its recipe alone.

:class:`Fuzzer` runs the cases in one worker process that loads them one after another and
reports each outcome on a pipe. The parent gives every case a deadline; a worker that dies
(a signal, ``abort()`` in a ``GGML_ASSERT``) or overruns is recorded as a crash or a hang for
that case, killed, and replaced, so thousands of cases stay fast while each one is isolated.
The only acceptable outcomes are a clean load (followed by a tokenization and, for full
loads, a short generation) or a typed :class:`~llama_cpp.LlamaError`.

Needs the optional ``gguf`` package.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

#: Outcomes of a case; only the first two are acceptable.
CLEAN, TYPED, UNTYPED, CRASH, HANG = "clean", "typed", "untyped", "crash", "hang"

GGUF_MAGIC = b"GGUF"

# GGUF value types (gguf.h's enum gguf_type) and the byte size of the fixed-size ones.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = range(10)
_UINT64, _INT64, _FLOAT64 = 10, 11, 12
_TYPE_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


# ------------------------------------------------------------------------------------------
# The layout of a GGUF file: where its counts, lengths, types, dims and offsets are
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One scalar of a GGUF header: ``size`` bytes at ``offset``; ``kind`` says what it is
    (``count``, ``length``, ``type``, ``n_dims``, ``dim``, ``ggml_type``, ``offset``,
    ``value``)."""

    offset: int
    size: int
    kind: str


def gguf_layout(data: bytes, *, max_array: int = 64) -> tuple[list[Field], int]:
    """The structural fields of the GGUF file ``data`` and the end of its tensor infos.

    Only well-formed files are parsed (the bases, not the mutants). Arrays are described by
    their first ``max_array`` elements, so that a 262k-token vocabulary does not drown the
    counts and types in string lengths.

    Raises:
        ValueError: ``data`` is not a well-formed GGUF file.
    """
    fields: list[Field] = []
    pos = 4

    def scalar(size: int, kind: str, fmt: str) -> int:
        nonlocal pos
        if pos + size > len(data):
            raise ValueError(f"truncated at {pos}")
        fields.append(Field(pos, size, kind))
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += size
        return int(value)

    def string(record: bool = True) -> None:
        nonlocal pos
        if record:
            n = scalar(8, "length", "<Q")
        else:
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8
        pos += n

    def value(vtype: int, record: bool = True) -> None:
        nonlocal pos
        if vtype == _STRING:
            string(record)
        elif vtype == _ARRAY:
            etype = scalar(4, "type", "<I")
            n = scalar(8, "count", "<Q")
            if etype in _TYPE_SIZE:
                if n:
                    fields.append(Field(pos, _TYPE_SIZE[etype], "value"))
                pos += n * _TYPE_SIZE[etype]
            else:
                for i in range(n):
                    value(etype, record=i < max_array)
        elif vtype in _TYPE_SIZE:
            if record:
                fields.append(Field(pos, _TYPE_SIZE[vtype], "value"))
            pos += _TYPE_SIZE[vtype]
        else:
            raise ValueError(f"unknown type {vtype} at {pos}")

    scalar(4, "version", "<I")
    n_tensors = scalar(8, "count", "<Q")
    n_kv = scalar(8, "count", "<Q")
    for _ in range(n_kv):
        string()
        value(scalar(4, "type", "<I"))
    for _ in range(n_tensors):
        string()
        n_dims = scalar(4, "n_dims", "<I")
        for _ in range(n_dims):
            scalar(8, "dim", "<Q")
        scalar(4, "ggml_type", "<I")
        scalar(8, "offset", "<Q")
    if pos > len(data):
        raise ValueError("truncated")
    return fields, pos


# ------------------------------------------------------------------------------------------
# Base files
# ------------------------------------------------------------------------------------------


def default_vocab_dir() -> Path | None:
    """llama.cpp's ``models/`` folder (the ``ggml-vocab-*.gguf`` files) of the pinned source
    the package was built from, or None when this is not a source checkout."""
    record = Path(__file__).resolve().parents[3] / "lib" / "llama-build.json"
    if not record.exists():
        return None
    models = Path(str(json.loads(record.read_text())["source_dir"])) / "models"
    return models if models.is_dir() else None


def header_copy(source: Path, target: Path) -> Path:
    """Copy the metadata and tensor infos of ``source`` to ``target`` and extend it, sparse, to
    the size of ``source``: a 250 MB model's header for the cost of its first megabytes. The
    weights read as zeros (loading with ``vocab_only=True`` never reads them)."""
    with source.open("rb") as f:
        head = f.read(8 << 20)
    _, end = gguf_layout(head)
    with target.open("wb") as f:
        f.write(head[: end + 64])
        f.truncate(source.stat().st_size)
    return target


@dataclass(frozen=True)
class Base:
    """A base file and how it is loaded: ``full`` (a context, a generation) or vocab-only."""

    name: str
    path: Path
    full: bool


def make_bases(
    workdir: Path, *, vocab_dir: Path | None = None, default_model: Path | None = None
) -> list[Base]:
    """Write (or find) the base files in ``workdir``: the tiny llama, MoE and reranker, every
    ``ggml-vocab-*.gguf`` in ``vocab_dir`` and the header of ``default_model``."""
    from llama_cpp.testing import write_tiny_llama, write_tiny_moe, write_tiny_reranker

    workdir.mkdir(parents=True, exist_ok=True)
    bases = [
        Base("tiny-llama", write_tiny_llama(workdir / "tiny-llama.gguf"), True),
        Base("tiny-moe", write_tiny_moe(workdir / "tiny-moe.gguf"), True),
        Base("tiny-reranker", write_tiny_reranker(workdir / "tiny-reranker.gguf"), True),
    ]
    if vocab_dir is not None:
        for vocab in sorted(vocab_dir.glob("ggml-vocab-*.gguf")):
            bases.append(Base(vocab.stem.removeprefix("ggml-"), vocab, False))
    if default_model is not None:
        bases.append(
            Base("default-header", header_copy(default_model, workdir / "default-header.gguf"), False)
        )
    return bases


# ------------------------------------------------------------------------------------------
# Mutations
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A recipe: ``base`` mutated by ``kind`` with ``args``. ``full`` loads it with a context
    (then generates); otherwise vocab-only (then tokenizes)."""

    base: str
    kind: str
    args: tuple[Any, ...] = ()
    full: bool = False

    def label(self) -> str:
        return f"{self.base}:{self.kind}{list(self.args)}"


# Values that break the assumptions of a loader: zero, one past small limits, sign bits,
# all ones.
_INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 255, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
_INTERESTING.append(1 << 40)


def _flip(data: bytearray, fields: list[Field], rng: random.Random) -> tuple[int, int]:
    """Pick a (offset, xor) byte flip, three times in four inside a structural field."""
    if fields and rng.random() < 0.75:
        f = rng.choice(fields)
        offset = f.offset + rng.randrange(f.size)
    else:
        offset = rng.randrange(len(data))
    return offset, rng.choice([1 << rng.randrange(8), 0xFF, rng.randrange(1, 256)])


def _set(fields: list[Field], rng: random.Random) -> tuple[int, int, int]:
    """Pick a (offset, size, value): a structural field set to an interesting value."""
    f = rng.choice([f for f in fields if f.kind != "value"] or fields)
    return f.offset, f.size, rng.choice(_INTERESTING) & ((1 << (8 * f.size)) - 1)


def apply_bytes(data: bytes, kind: str, args: tuple[Any, ...]) -> bytes:
    """The bytes of a byte-level mutation (``truncate``, ``flip``, ``set``) of ``data``."""
    out = bytearray(data)
    if kind == "truncate":
        return bytes(out[: args[0]])
    if kind == "flip":
        for offset, xor in zip(args[0::2], args[1::2], strict=True):
            out[offset] ^= xor
        return bytes(out)
    if kind == "set":
        offset, size, value = args
        out[offset : offset + size] = int(value).to_bytes(size, "little")
        return bytes(out)
    raise ValueError(f"not a byte mutation: {kind}")


def make_cases(bases: list[Base], n: int, *, seed: int = 0) -> list[Case]:
    """``n`` cases drawn from ``seed``: a quarter truncations, half byte flips and field sets,
    a quarter crafted metadata (:data:`CRAFTS`), spread over ``bases``."""
    from llama_cpp.testing.fuzz_crafts import CRAFTS

    rng = random.Random(seed)
    layouts: dict[str, tuple[list[Field], int, int]] = {}
    for base in bases:
        data = base.path.read_bytes() if base.path.stat().st_size < (64 << 20) else _head(base.path)
        fields, end = gguf_layout(data)
        layouts[base.name] = (fields, end, base.path.stat().st_size)
    crafts = sorted(CRAFTS)
    cases: list[Case] = []
    for i in range(n):
        base = bases[i % len(bases)]
        fields, end, size = layouts[base.name]
        roll = rng.random()
        if roll < 0.25:
            # Truncate mostly inside the header, where every byte is a different field.
            cut = rng.randrange(end) if rng.random() < 0.8 or size <= end else rng.randrange(end, size)
            cases.append(Case(base.name, "truncate", (cut,), base.full))
        elif roll < 0.55:
            flips: list[int] = []
            for _ in range(rng.choice([1, 1, 1, 2, 4])):
                flips.extend(_flip(bytearray(end), fields, rng))
            cases.append(Case(base.name, "flip", tuple(flips), base.full))
        elif roll < 0.75:
            cases.append(Case(base.name, "set", _set(fields, rng), base.full))
        else:
            name = crafts[rng.randrange(len(crafts))]
            cases.append(Case(base.name, "craft", (name, rng.randrange(1 << 30)), base.full))
    return cases


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(8 << 20)


def materialize(case: Case, base: Base, target: Path) -> Path:
    """Write the mutant of ``case`` (of ``base``) to ``target``."""
    if case.kind == "patch":
        from llama_cpp.testing.fuzz_crafts import patch

        return patch(base.path, target, *case.args)
    if case.kind == "craft":
        from llama_cpp.testing.fuzz_crafts import craft

        name, seed = case.args
        return craft(base.path, target, name, random.Random(seed))
    size = base.path.stat().st_size
    if size < (64 << 20):
        target.write_bytes(apply_bytes(base.path.read_bytes(), case.kind, case.args))
        return target
    # A large base: mutate its head and keep the rest sparse (zeros) up to the original size.
    head = _head(base.path)
    mutated = apply_bytes(head, case.kind, case.args)
    with target.open("wb") as f:
        f.write(mutated)
        if case.kind != "truncate":
            f.truncate(size)
    return target


# ------------------------------------------------------------------------------------------
# The worker and the parent
# ------------------------------------------------------------------------------------------


def load_once(path: str, full: bool) -> tuple[str, str]:
    """Load ``path`` through the public API and use it; return (outcome, detail)."""
    from llama_cpp import Llama, LlamaError

    try:
        if full:
            with Llama(path, n_ctx=64, n_batch=32, n_threads=1, verbose=False) as llm:
                tokens = llm.tokenize(b"Hello world", add_bos=True)
                llm.detokenize(tokens)
                llm.create_completion("Hello", max_tokens=4)
        else:
            with Llama(path, vocab_only=True, verbose=False) as llm:
                tokens = llm.tokenize("Hello wörld 😀 123".encode(), add_bos=True, special=True)
                llm.detokenize(tokens)
    except LlamaError as e:
        return TYPED, f"{type(e).__name__}: {e}"
    except Exception as e:  # an untyped error is a finding, not a reason to stop the worker
        return UNTYPED, f"{type(e).__name__}: {e}"
    return CLEAN, ""


def _worker(result_fd: int) -> None:
    """Read ``{"path", "full"}`` lines on stdin, answer ``{"outcome", "detail"}`` lines on
    ``result_fd`` (stdout is left to llama.cpp's logs)."""
    import logging

    logging.disable(logging.CRITICAL)
    with os.fdopen(result_fd, "w", buffering=1) as out:
        for line in sys.stdin:
            request = json.loads(line)
            outcome, detail = load_once(request["path"], request["full"])
            out.write(json.dumps({"outcome": outcome, "detail": detail[:500]}) + "\n")


@dataclass
class Result:
    case: Case
    outcome: str
    detail: str


@dataclass
class Report:
    """What a run found: every result, and the counts by outcome."""

    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def counts(self) -> Counter[str]:
        return Counter(r.outcome for r in self.results)

    @property
    def failures(self) -> list[Result]:
        """The cases that crashed, hung or raised an untyped error."""
        return [r for r in self.results if r.outcome not in (CLEAN, TYPED)]

    def summary(self) -> str:
        c = self.counts
        return (
            f"{len(self.results)} cases in {self.seconds:.1f} s: {c[CLEAN]} clean loads, "
            f"{c[TYPED]} typed errors, {c[CRASH]} crashes, {c[HANG]} hangs, {c[UNTYPED]} untyped errors"
        )


class Fuzzer:
    """Runs cases in one worker subprocess, replaced whenever a case kills or hangs it.

    Args:
        workdir: Where the mutants are written (one file at a time, reused).
        timeout_s: The deadline of one case (load, tokenize, generate).
    """

    def __init__(self, workdir: Path, *, timeout_s: float = 20.0) -> None:
        self.workdir = workdir
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._results: TextIO | None = None

    def __enter__(self) -> Fuzzer:
        return self

    @property
    def worker_pid(self) -> int | None:
        """The process id of the worker (None until a case runs, or after a crash or hang)."""
        return None if self._proc is None else self._proc.pid

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.testing.fuzz_gguf", "--worker", str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,),
            text=True,
            # An abort would otherwise attach gdb to print a backtrace, for many seconds.
            env=dict(os.environ, GGML_NO_BACKTRACE="1"),
        )
        os.close(write_fd)
        self._results = os.fdopen(read_fd, "r", buffering=1)

    def close(self) -> None:
        """Stop the worker (safe to call twice)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            assert self._proc.stdin is not None
            assert self._results is not None
            self._proc.stdin.close()
            self._results.close()
            self._proc = None

    def run_one(self, path: Path, full: bool) -> tuple[str, str]:
        """Load ``path`` in the worker; return (outcome, detail)."""
        if self._proc is None:
            self._start()
        assert self._proc is not None
        assert self._proc.stdin is not None
        assert self._results is not None
        try:
            self._proc.stdin.write(json.dumps({"path": str(path), "full": full}) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker is dead: readline() below sees EOF
        with selectors.DefaultSelector() as sel:
            sel.register(self._results, selectors.EVENT_READ)
            ready = sel.select(self.timeout_s)
        if not ready:
            self.close()
            return HANG, f"no answer in {self.timeout_s:g} s"
        line = self._results.readline()
        if not line:
            code = self._proc.wait()
            self.close()
            name = signal.Signals(-code).name if code < 0 else f"exit status {code}"
            return CRASH, f"worker died: {name}"
        answer = json.loads(line)
        return str(answer["outcome"]), str(answer["detail"])

    def run(
        self,
        cases: Iterable[Case],
        bases: list[Base],
        *,
        deadline_s: float | None = None,
        progress: Callable[[int, Result], None] | None = None,
    ) -> Report:
        """Run ``cases`` (until ``deadline_s`` seconds have passed, if given)."""
        by_name = {b.name: b for b in bases}
        report = Report()
        start = time.monotonic()
        target = self.workdir / "case.gguf"
        for i, case in enumerate(cases):
            if deadline_s is not None and time.monotonic() - start > deadline_s:
                break
            materialize(case, by_name[case.base], target)
            outcome, detail = self.run_one(target, case.full)
            result = Result(case, outcome, detail)
            report.results.append(result)
            if progress is not None:
                progress(i, result)
        report.seconds = time.monotonic() - start
        return report


def case_to_json(case: Case) -> dict[str, Any]:
    """``case`` as a JSON object (a finding's recipe)."""
    return asdict(case)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m llama_cpp.testing.fuzz_gguf --worker FD (see benchmarks/fuzz_loader.py)")
