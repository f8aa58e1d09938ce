"""Integers and decimal numbers in a range, integers that are multiples of k, as GBNF.

Numbers are written without an exponent and with at most 15 digits (16 for integers), so
that ``json.loads`` reads back exactly the value the grammar checked: any two decimals with
at most 15 significant digits parse to distinct doubles, in the same order (DBL_DIG), and so
a bound compares with the parsed double exactly as with the decimal text. A bound that is
itself a double needing 16-17 digits can never be hit by such a decimal; it is compared as
the exact value of that double, strictly. ``7.0e6477`` (infinity) cannot be written.

A digit automaton does the work: it reads the digits of numbers of one length, staying
"tight" against the digits of the lower and upper bound while it follows them, and carries
the remainder modulo k; its states become the grammar's rules.
"""

from __future__ import annotations

import math
from decimal import Decimal
from functools import cache

from llama_cpp._gbnf import Rules

#: Digits of a number (integer and fraction together) and of an integer.
NUMBER_DIGITS = 15
INTEGER_DIGITS = 16
#: Most automaton states one multipleOf may need (digits x remainders x tightness).
MAX_MULTIPLE_STATES = 40000
#: Most multiples listed one by one instead.
MAX_ENUMERATED = 1000

#: A bound: its exact value and whether it is included.
Bound = tuple[Decimal, bool]


class NumberError(Exception):
    """No number satisfies the constraints, or too large a grammar (the reason)."""


def schema_bound(value: int | float, inclusive: bool) -> Bound:
    """The decimal bound equivalent to a schema's bound for numbers of at most 15 digits."""
    if isinstance(value, int):
        return Decimal(value), inclusive
    shortest = Decimal(repr(value))
    if len(shortest.as_tuple().digits) <= NUMBER_DIGITS:
        return shortest, inclusive
    # No 15-digit decimal parses to this double: compare with its exact value, strictly.
    return Decimal(value), False


_END = ""  # the rule of a number that is complete: nothing follows


class _Digits:
    """The digit automaton's rules, made once per state (the states form a DAG)."""

    def __init__(self, rules: Rules, hint: str, modulus: int) -> None:
        self.rules = rules
        self.hint = hint
        self.modulus = modulus
        self.rule = cache(self._rule)

    def _rule(
        self, *, int_left: int, frac_left: int, lo: str | None, hi: str | None, rem: int, phase: int
    ) -> str | None:
        """The rule for the rest of a number once ``int_left`` integer digits remain to be
        written (then up to ``frac_left`` fraction digits), ``lo``/``hi`` the digits of the
        bounds still followed exactly (None once above/below them), ``rem`` the value so far
        modulo k. ``phase``: 0 in the integer part or just after it, 1 just after the ".",
        2 inside the fraction. None if no number can be completed from here."""
        alternatives = []
        if int_left == 0 and phase != 1 and rem == 0 and (lo is None or not lo.strip("0")):
            alternatives.append("")  # the end: what is left of the lower bound is zeros
        if int_left == 0 and phase == 0:
            if frac_left > 0:
                after_dot = self.rule(int_left=0, frac_left=frac_left, lo=lo, hi=hi, rem=rem, phase=1)
                if after_dot is not None:
                    alternatives.append(f'"." {after_dot}')
        elif int_left > 0 or frac_left > 0:
            next_int, next_frac = (int_left - 1, frac_left) if int_left else (0, frac_left - 1)
            by_next: dict[str, list[int]] = {}
            first, last = int(lo[0]) if lo else 0, int(hi[0]) if hi else 9
            for d in range(first, last + 1):
                nxt = self.rule(
                    int_left=next_int,
                    frac_left=next_frac,
                    lo=lo[1:] if lo and d == first else None,
                    hi=hi[1:] if hi and d == last else None,
                    rem=(rem * 10 + d) % self.modulus,
                    phase=0 if int_left else 2,
                )
                if nxt is not None:
                    by_next.setdefault(nxt, []).append(d)
            for nxt, ds in by_next.items():
                cls = "[" + "".join(str(d) for d in ds) + "]"
                if len(ds) > 2 and ds == list(range(ds[0], ds[-1] + 1)):
                    cls = f"[{ds[0]}-{ds[-1]}]"
                alternatives.append(cls if nxt == _END else f"{cls} {nxt}")
        if not alternatives:
            return None
        if alternatives == [""]:
            return _END
        return self.rules.add(f"{self.hint}-d", " | ".join(alternatives))


def _fixed_length(digits: _Digits, length: int, frac: int, lo: int, hi: int) -> str | None:
    """Numbers of ``length`` integer digits and up to ``frac`` fraction digits whose value
    times 10**frac is in ``lo..hi`` (both with length + frac digits)."""
    width = length + frac
    return digits.rule(
        int_left=length, frac_left=frac, lo=str(lo).zfill(width), hi=str(hi).zfill(width), rem=0, phase=0
    )


def _magnitudes(digits: _Digits, lo: Bound, hi: Bound, max_digits: int, fraction: bool) -> list[str]:
    """Alternatives for the non-negative numbers in ``lo..hi`` (``lo`` >= 0)."""
    out = []
    for length in range(1, max_digits + 1):
        frac = max_digits - length if fraction else 0
        start: Bound = (Decimal(10 ** (length - 1)) if length > 1 else Decimal(0), True)
        end: Bound = (Decimal(10**length), False)
        low = max(lo, start, key=lambda b: (b[0], not b[1]))
        high = min(hi, end, key=lambda b: (b[0], b[1]))
        scale = Decimal(10**frac)
        # On the grid of numbers with `frac` fraction digits, as inclusive integers.
        scaled_low, scaled_high = low[0] * scale, high[0] * scale
        first = int(scaled_low) if scaled_low == int(scaled_low) and low[1] else int(scaled_low) + 1
        last = int(scaled_high) if scaled_high != int(scaled_high) or high[1] else int(scaled_high) - 1
        if first > last:
            continue
        rule = _fixed_length(digits, length, frac, first, last)
        if rule:
            out.append(rule)
    return out


def number_rule(
    rules: Rules, hint: str, lo: Bound | None, hi: Bound | None, *, integer: bool, multiple_of: int = 1
) -> str:
    """The name of a rule matching the JSON numbers (integers if ``integer``) in ``lo..hi``
    (None: unbounded), integers that are multiples of ``multiple_of``.

    Raises:
        NumberError: No such number, or a multipleOf needing too large a grammar.
    """
    max_digits = INTEGER_DIGITS if integer else NUMBER_DIGITS
    limit = Decimal(10**max_digits)
    lo = lo if lo is not None and lo[0] > -limit else (-limit, False)
    hi = hi if hi is not None and hi[0] < limit else (limit, False)
    if integer:
        first = math.ceil(lo[0]) if lo[1] else math.floor(lo[0]) + 1
        last = math.floor(hi[0]) if hi[1] else math.ceil(hi[0]) - 1
        lo, hi = (Decimal(first), True), (Decimal(last), True)
        if multiple_of > 1:
            count = last // multiple_of - -(-first // multiple_of) + 1
            if 0 < count <= MAX_ENUMERATED:  # few multiples: list them
                values = range(-(-first // multiple_of) * multiple_of, last + 1, multiple_of)
                return rules.add(hint, " | ".join(f'"{v}"' for v in values))
            if max_digits * multiple_of > MAX_MULTIPLE_STATES:
                raise NumberError(
                    f"multipleOf {multiple_of} with these bounds needs too large a grammar"
                    f" (more than {MAX_ENUMERATED} multiples and a modulus above"
                    f" {MAX_MULTIPLE_STATES // max_digits})"
                )
    digits = _Digits(rules, hint, multiple_of)
    positive = _magnitudes(digits, (Decimal(0), True) if lo[0] < 0 else lo, hi, max_digits, not integer)
    negative: list[str] = []
    if lo[0] < 0:
        # -x for the magnitudes x in (max(-hi, 0), -lo]; never "-0".
        smallest = (-hi[0], hi[1]) if hi[0] < 0 else (Decimal(0), False)
        negative = _magnitudes(digits, smallest, (-lo[0], lo[1]), max_digits, not integer)
    alternatives = list(positive)
    if negative:
        neg = negative[0] if len(negative) == 1 else rules.add(f"{hint}-neg", " | ".join(negative))
        alternatives.append(f'"-" {neg}')
    if not alternatives:
        raise NumberError(f"no number of at most {max_digits} digits satisfies these bounds")
    return rules.add(hint, " | ".join(alternatives))
