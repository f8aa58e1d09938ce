"""List the architectures whose graph, at the pinned llama.cpp, asserts on head sizes.

The binding's GGUF validation (``kArchsHeadSizesEqual`` and ``kArchsRotIsHeadSize`` in
``src/bindings/llama_cpp.cpp``) refuses a file whose head sizes would fail these asserts at
the first decode. Rerun this after moving the pin and update the two lists::

    python scripts/graph_asserts.py ~/.cache/llama-cpp-nanobind/src/llama.cpp-<commit>

An architecture is listed when its graph's constructor (``llama_model_<name>::graph::graph``)
opens with the assert; the name comes from the model factory (``llama-model.cpp``) and
``llama-arch.cpp``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# n_embd_head is one head size and the assert compares it with the other (either way round).
HEAD_SIZES_EQUAL = re.compile(
    r"^\s*GGML_ASSERT\((?:n_embd_head == hparams\.n_embd_head_[kv]\(\)"
    r"|hparams\.n_embd_head_v\(\) == hparams\.n_embd_head_k\(\))\);",
    re.M,
)
#: How far into a graph's constructor the asserts are looked for: they open it, where every
#: model of the architecture meets them (asserts further down may sit in a variant's branch).
OPENING_LINES = 12
ROT_IS_HEAD_SIZE = re.compile(r"^\s*GGML_ASSERT\(n_embd_head == n_rot\);", re.M)
GRAPH_CONSTRUCTOR = re.compile(r"\b(llama_model_\w+)::graph(?:<[^>]*>)?::graph\(")


def archs_of_classes(src: Path) -> dict[str, list[str]]:
    """Model class -> the architecture names the factory builds it for."""
    names = dict(
        re.findall(r"\{\s*(LLM_ARCH_\w+),\s*\"([^\"]+)\"\s*\}", (src / "llama-arch.cpp").read_text())
    )
    classes: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in (src / "llama-model.cpp").read_text().splitlines():
        if case := re.match(r"\s*case (LLM_ARCH_\w+):", line):
            pending.append(case.group(1))
        elif (made := re.search(r"return new (llama_model_\w+)\(params\)", line)) and pending:
            classes.setdefault(made.group(1), []).extend(names[a] for a in pending)
            pending = []
        elif line.strip() and not line.strip().startswith("//"):
            pending = []
    return classes


def main() -> int:
    src = Path(sys.argv[1]) / "src"
    classes = archs_of_classes(src)
    equal: set[str] = set()
    rot: set[str] = set()
    for path in sorted((src / "models").glob("*.cpp")):
        text = path.read_text()
        for constructor in GRAPH_CONSTRUCTOR.finditer(text):
            opening = "\n".join(text[constructor.start() :].splitlines()[:OPENING_LINES])
            archs = classes.get(constructor.group(1), [])
            if HEAD_SIZES_EQUAL.search(opening):
                equal.update(archs)
            if ROT_IS_HEAD_SIZE.search(opening):
                rot.update(archs)
    print("kArchsHeadSizesEqual:", ", ".join(f'"{a}"' for a in sorted(equal)))
    print("kArchsRotIsHeadSize:", ", ".join(f'"{a}"' for a in sorted(rot)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
