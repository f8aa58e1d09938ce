"""JSON strings that match a regular expression (``pattern``) and a length range at once.

The pattern is parsed with Python's own regex parser (jsonschema checks ``pattern`` with
:func:`re.search`), compiled to an NFA (Thompson), and its product with a counter of code
points becomes a right-linear GBNF grammar: every string it accepts matches the whole pattern
(a subset of what ``re.search`` accepts) and has an allowed length. Classes that Python reads
as Unicode (``\\d``, ``\\w``, ``\\s``) are narrowed to ASCII, which keeps the set a subset.
"""

from __future__ import annotations

import re
from re import _constants as sre
from re import _parser as sre_parse
from typing import Any, TypeAlias

from llama_cpp._gbnf import CharSet, Rules, complement, json_chars, normalize, union

#: Most NFA states a pattern may compile to, and most (state, length) pairs of the product.
MAX_NFA_STATES = 4000
MAX_PRODUCT_STATES = 20000

# Years 0001-9999 (date.fromisoformat refuses 0000), days up to 28: every date valid
# whatever the month and year.
_DATE = r"(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
#: The formats the grammar enforces, each by a pattern whose strings the format's checker
#: accepts (a subset); the answer's validation asserts exactly these.
FORMAT_PATTERNS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    # Dotted quads without leading zeros, as ipaddress.IPv4Address reads them.
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    # jsonschema asks only for an "@": a plain address is a subset.
    "email": r"[a-zA-Z0-9._%+-]{1,64}@[a-zA-Z0-9-]{1,63}(\.[a-zA-Z0-9-]{1,63}){1,3}",
    "idn-email": r"[a-zA-Z0-9._%+-]{1,64}@[a-zA-Z0-9-]{1,63}(\.[a-zA-Z0-9-]{1,63}){1,3}",
    "json-pointer": r"(/([^~/]|~[01])*)*",
}


#: A node of the parsed regex: opcodes and arguments as :mod:`re._parser` makes them.
Node: TypeAlias = Any


class PatternError(Exception):
    """The pattern uses a construct the grammar cannot enforce (the reason)."""


def _ascii_part(regex: str) -> CharSet:
    return normalize((c, c) for c in range(128) if re.fullmatch(regex, chr(c)))


_CATEGORIES = {
    sre.CATEGORY_DIGIT: r"\d",
    sre.CATEGORY_NOT_DIGIT: r"\D",
    sre.CATEGORY_SPACE: r"\s",
    sre.CATEGORY_NOT_SPACE: r"\S",
    sre.CATEGORY_WORD: r"\w",
    sre.CATEGORY_NOT_WORD: r"\W",
}
_NON_ASCII: CharSet = ((128, 0x10FFFF),)


class _Nfa:
    def __init__(self, dotall: bool) -> None:
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[CharSet, int]]] = []
        self.dotall = dotall

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise PatternError(f"the pattern needs more than {MAX_NFA_STATES} automaton states")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def chars(self, chars: CharSet) -> tuple[int, int]:
        s, e = self.state(), self.state()
        if chars:
            self.edges[s].append((chars, e))
        return s, e

    def seq(self, items: Node) -> tuple[int, int]:
        start = end = self.state()
        for op, av in items:
            s, e = self.item(op, av)
            self.eps[end].append(s)
            end = e
        return start, end

    def item(self, op: Node, av: Node) -> tuple[int, int]:  # noqa: PLR0911 - one return per opcode
        if op is sre.LITERAL:
            return self.chars(((av, av),))
        if op is sre.NOT_LITERAL:
            return self.chars(complement(((av, av),)))
        if op is sre.ANY:
            return self.chars(complement(() if self.dotall else ((10, 10),)))
        if op is sre.IN:
            return self.chars(_in_set(av))
        if op is sre.BRANCH:
            s, e = self.state(), self.state()
            for alternative in av[1]:
                a, b = self.seq(alternative)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        if op is sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise PatternError("inline flags inside the pattern are not supported")
            return self.seq(sub)
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # lazy or greedy: the same strings
            low, high, sub = av
            start = end = self.state()
            for _ in range(low):
                s, e = self.seq(sub)
                self.eps[end].append(s)
                end = e
            if high is sre.MAXREPEAT:
                s, e = self.seq(sub)
                self.eps[end].append(s)
                self.eps[e].append(s)
                after = self.state()
                self.eps[end].append(after)
                self.eps[e].append(after)
                return start, after
            after = self.state()
            for _ in range(high - low):
                self.eps[end].append(after)
                s, e = self.seq(sub)
                self.eps[end].append(s)
                end = e
            self.eps[end].append(after)
            return start, after
        if op is sre.AT:
            raise PatternError("an anchor inside the pattern is not supported")
        names = {
            sre.GROUPREF: "backreferences",
            sre.GROUPREF_EXISTS: "conditional groups",
            sre.ASSERT: "lookarounds",
            sre.ASSERT_NOT: "lookarounds",
        }
        raise PatternError(f"{names.get(op, str(op).lower())} are not supported")


def _in_set(items: Node) -> CharSet:
    negate = bool(items) and items[0][0] is sre.NEGATE
    ranges: list[tuple[int, int]] = []
    loose = False  # a class whose non-ASCII members are not known exactly
    for op, av in items[1:] if negate else items:
        if op is sre.LITERAL:
            ranges.append((av, av))
        elif op is sre.RANGE:
            ranges.append(av)
        elif op is sre.CATEGORY and av in _CATEGORIES:
            ranges.extend(_ascii_part(_CATEGORIES[av]))
            loose = True
        else:
            raise PatternError(f"{str(op).lower()} in a character class is not supported")
    chars = normalize(ranges)
    if not negate:
        return complement(complement(chars))  # no surrogates
    # The complement of a superset: Unicode members of a category all count as excluded.
    return complement(union(chars, _NON_ASCII) if loose else chars)


def _strip_anchors(items: list[Any]) -> list[Any]:
    """The top-level sequence without a leading ``^``/``\\A`` and a trailing ``$``/``\\Z``
    (the grammar matches the whole string anyway), also inside a top-level alternation."""
    begins = (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)
    ends = (sre.AT_END, sre.AT_END_STRING)
    while items and items[0][0] is sre.AT and items[0][1] in begins:
        items = items[1:]
    while items and items[-1][0] is sre.AT and items[-1][1] in ends:
        items = items[:-1]
    if len(items) == 1 and items[0][0] is sre.BRANCH:
        alternatives = [_strip_anchors(list(alt)) for alt in items[0][1][1]]
        items = [(sre.BRANCH, (None, alternatives))]
    return items


def string_rule(rules: Rules, hint: str, pattern: str, min_length: int, max_length: int | None) -> str:
    """The name of a rule matching a JSON string (quotes included) whose text fully matches
    ``pattern`` and has ``min_length`` to ``max_length`` (``None``: any) code points.

    Raises:
        PatternError: A construct the grammar cannot enforce, a pattern too large, an invalid
            regex, or no string that satisfies it all.
    """
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as e:
        raise PatternError(f"invalid regex: {e}") from None
    flags = parsed.state.flags & ~(re.UNICODE | re.DOTALL)
    if flags:
        raise PatternError("regex flags are not supported")
    nfa = _Nfa(dotall=bool(parsed.state.flags & re.DOTALL))
    start, accept = nfa.seq(_strip_anchors(list(parsed)))

    # Epsilon-free, on the states a character leads to: read a character of a set, or stop.
    important = {start} | {t for edges in nfa.edges for _, t in edges}
    closures = {q: _closure(nfa.eps, q) for q in important}
    moves = {q: [edge for p in closures[q] for edge in nfa.edges[p]] for q in important}
    final = {q: accept in closures[q] for q in important}
    if max_length is not None and len(important) * (max_length + 1) > MAX_PRODUCT_STATES:
        # A subset: fewer characters than allowed, still at least min_length.
        max_length = max(min_length, MAX_PRODUCT_STATES // len(important) - 1)
    limit = max_length if max_length is not None else min_length

    def step(count: int) -> int:
        return count + 1 if max_length is not None else min(count + 1, min_length)

    # Forward: the reachable (state, count) pairs; backward: those that can still finish.
    seen = {(start, 0)}
    todo = [(start, 0)]
    while todo:
        q, n = todo.pop()
        if n >= limit and max_length is not None:
            continue
        for _, t in moves[q]:
            pair = (t, step(n))
            if pair not in seen:
                if len(seen) >= MAX_PRODUCT_STATES:
                    raise PatternError("the pattern with its length limits needs too large a grammar")
                seen.add(pair)
                todo.append(pair)
    back: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for q, n in seen:
        if max_length is None or n < max_length:
            for _, t in moves[q]:
                back.setdefault((t, step(n)), []).append((q, n))
    live = {(q, n) for q, n in seen if final[q] and n >= min_length}
    todo = list(live)
    while todo:
        for pair in back.get(todo.pop(), ()):
            if pair not in live:
                live.add(pair)
                todo.append(pair)
    if (start, 0) not in live:
        raise PatternError("no string matches the pattern within the length limits")

    names = {pair: rules.reserve(f"{hint}-s") for pair in sorted(live)}
    for (q, n), name in names.items():
        by_target: dict[tuple[int, int], list[tuple[int, int]]] = {}
        if max_length is None or n < max_length:
            for chars, t in moves[q]:
                if (t, step(n)) in live:
                    by_target.setdefault((t, step(n)), []).extend(chars)
        alternatives = [f"{json_chars(normalize(chars))} {names[t]}" for t, chars in by_target.items()]
        if final[q] and n >= min_length:
            alternatives.insert(0, "")
        rules.define(name, " | ".join(alternatives) if alternatives != [""] else '""')
    return rules.add(hint, f'"\\"" {names[(start, 0)]} "\\""')


def _closure(eps: list[list[int]], q: int) -> set[int]:
    out = {q}
    todo = [q]
    while todo:
        for t in eps[todo.pop()]:
            if t not in out:
                out.add(t)
                todo.append(t)
    return out
