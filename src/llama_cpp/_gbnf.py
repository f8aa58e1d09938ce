"""GBNF building blocks shared by the JSON schema converter: rule tables, literals,
character classes, and the JSON string characters of a set of code points."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

#: Sorted, disjoint, inclusive code point ranges.
CharSet = tuple[tuple[int, int], ...]

#: Code points a grammar can emit: UTF-8 text has no surrogates.
UNIVERSE: CharSet = ((0, 0xD7FF), (0xE000, 0x10FFFF))

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def normalize(ranges: Iterable[tuple[int, int]]) -> CharSet:
    """Sorted, merged ranges."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] <= r[1]):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def intersect(a: CharSet, b: CharSet) -> CharSet:
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def union(a: CharSet, b: CharSet) -> CharSet:
    return normalize(a + b)


def complement(a: CharSet) -> CharSet:
    """The code points of :data:`UNIVERSE` not in ``a``."""
    out, start = [], 0
    for lo, hi in a:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= 0x10FFFF:
        out.append((start, 0x10FFFF))
    return intersect(tuple(out), UNIVERSE)


def contains(a: CharSet, c: int) -> bool:
    return any(lo <= c <= hi for lo, hi in a)


def _class_char(c: int) -> str:
    if 0x20 <= c < 0x7F and chr(c) not in "\\]-^[":
        return chr(c)
    if c <= 0xFF:
        return f"\\x{c:02X}"
    if c <= 0xFFFF:
        return f"\\u{c:04X}"
    return f"\\U{c:08X}"


def char_class(a: CharSet) -> str:
    """``[...]`` matching exactly the code points of ``a`` (non-empty)."""
    parts = []
    for lo, hi in a:
        parts.append(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}")
    return "[" + "".join(parts) + "]"


#: Alternatives above which :func:`choice` shares prefixes, and the deepest it nests groups.
_FLAT_CHOICE = 32
_MAX_TRIE_DEPTH = 24


def choice(texts: Sequence[str]) -> str:
    """A GBNF expression matching exactly one of ``texts`` (non-empty strings).

    A few become a flat alternation. Many become a prefix tree (``"1" ("2" | "3")``), so that
    no group has more alternatives than there are distinct next characters: llama.cpp's
    grammar keeps one stack per alternative it may be in, and compares each new stack with
    all the others, so a flat alternation of 100,000 values takes seconds to compile and to
    sample from, a tree milliseconds.
    """
    unique = list(dict.fromkeys(texts))
    if len(unique) <= _FLAT_CHOICE:
        return " | ".join(literal(t) for t in unique)
    return _tree(sorted(unique), 0)


def _tree(texts: list[str], depth: int) -> str:
    """Sorted, distinct ``texts`` as a prefix tree; "" among them is an empty alternative."""
    rest = [t for t in texts if t]
    if depth >= _MAX_TRIE_DEPTH:
        alternatives = [literal(t) for t in rest]
    else:
        alternatives = []
        for _, group in itertools.groupby(rest, key=lambda t: t[0]):
            members = list(group)
            first, last = members[0], members[-1]  # sorted: their common prefix is everyone's
            n = next((i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first))
            prefix = first[:n]
            if len(members) == 1:
                alternatives.append(literal(prefix))
            else:
                tails = [m[len(prefix) :] for m in members]
                alternatives.append(f"{literal(prefix)} ({_tree(tails, depth + 1)})")
    # An empty alternative, not "(...)?": llama.cpp's parser counts every rule made so far
    # against a limit each time it expands a repetition.
    return " | ".join(alternatives + ([""] if len(rest) < len(texts) else []))


def literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    out = []
    for ch in text:
        c = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif c < 0x20 or c == 0x7F:
            out.append(f"\\x{c:02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def json_chars(a: CharSet) -> str:
    """A GBNF expression matching one JSON-string character (raw or escaped) whose decoded
    code point is in ``a``; each alternative decodes to exactly one code point."""
    raw = intersect(a, complement(normalize([(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)])))
    alts = [char_class(raw)] if raw else []
    for lo, hi in intersect(a, ((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C))):
        for c in range(lo, hi + 1):
            alts.append(literal(_ESCAPES.get(chr(c), f"\\u{c:04x}")))
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


#: Any one JSON string character, raw or escaped; a ``\\u`` escape is never a surrogate, so
#: that each character is one code point (what minLength/maxLength count).
JSON_CHAR = (
    # A positive class: llama.cpp's decoder reads bytes F5-FF as code points past U+10FFFF,
    # which a negated class would let through.
    '[ !#-\\[\\]-\\uD7FF\\uE000-\\U0010FFFF] | "\\\\" ( ["\\\\/bfnrt] | '
    '"u" ( [0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2} ) )'
)

_NAME_RE = re.compile(r"[^a-zA-Z0-9-]+")


class Rules:
    """GBNF rules under unique names; a body seen before returns the rule made for it."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self._counts: dict[str, int] = {}  # the last suffix given to each base name

    def reserve(self, hint: str) -> str:
        """A fresh rule name (its body set later by :meth:`define`)."""
        base = _NAME_RE.sub("-", hint).strip("-") or "r"
        name, n = base, self._counts.get(base, 1)
        while name in self.rules:
            n += 1
            name = f"{base}-{n}"
        self._counts[base] = n
        self.rules[name] = ""
        return name

    def define(self, name: str, body: str) -> None:
        self.rules[name] = body

    def add(self, hint: str, body: str) -> str:
        """The name of a rule ``body`` (shared with an identical rule made before)."""
        known = self._by_body.get(body)
        if known is not None:
            return known
        name = self.reserve(hint)
        self.rules[name] = body
        self._by_body[body] = name
        return name

    def text(self, root: str = "root") -> str:
        """The rules that ``root`` uses (a conversion that dropped a part may leave others)."""
        used, todo = {root}, [root]
        while todo:
            for name in _names(self.rules[todo.pop()]):
                if name not in used and name in self.rules:
                    used.add(name)
                    todo.append(name)
        return "".join(f"{name} ::= {body}\n" for name, body in self.rules.items() if name in used)


# A rule body's literals, character classes, and the names it refers to.
_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|([a-zA-Z0-9-]+)')


def _names(body: str) -> list[str]:
    return [m.group(1) for m in _TOKEN_RE.finditer(body) if m.group(1)]
