"""``allOf``: one schema equivalent to (or stricter than) all of its parts."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeAlias

from llama_cpp._schema_common import (
    ANNOTATIONS,
    LOWER_BOUNDS,
    MAX_BRANCHES,
    UPPER_BOUNDS,
    Json,
    NoValue,
    Refused,
    canonical,
)

#: The schema a ``$ref`` (first argument) points to, at a pointer (second, for errors).
Resolve: TypeAlias = Callable[[str, str], Json]


def merge(parts: list[Json], ptr: str, resolve: Resolve) -> dict[str, Any]:
    """One schema equivalent to (or stricter than) all of ``parts``, their ``$ref``s
    (``resolve`` finds the target of one) and nested allOfs merged in.

    Raises:
        Refused: What a merge cannot express (two different patterns, a recursive $ref...).
        NoValue: No value satisfies all the parts.
    """
    out: dict[str, Any] = {}
    flat: list[dict[str, Any]] = []
    for part in parts:
        flat.extend(_expand(part, ptr, resolve, set()))
    types: set[str] | None = None
    for part in flat:
        for key, value in part.items():
            if key in ANNOTATIONS:
                continue
            if key == "type":
                kinds = {value} if isinstance(value, str) else set(value)
                if "number" in kinds:
                    kinds.add("integer")
                types = kinds if types is None else types & kinds
            elif key == "properties":
                props = out.setdefault("properties", {})
                for name, sub in value.items():
                    props[name] = sub if name not in props else {"allOf": [props[name], sub]}
            elif key == "required":
                out["required"] = list(dict.fromkeys([*out.get("required", []), *value]))
            elif key in LOWER_BOUNDS or key in UPPER_BOUNDS:
                pick = max if key in LOWER_BOUNDS else min
                out[key] = pick(out[key], value) if key in out else value
            elif key == "multipleOf":
                out[key] = math.lcm(int(out.get(key, 1)), int(value))
            elif key == "uniqueItems":
                out[key] = out.get(key, False) or value
            elif key == "items":
                out[key] = value if key not in out else {"allOf": [out[key], value]}
            elif key == "prefixItems":
                old = out.get(key, [])
                out[key] = [
                    {"allOf": [old[i], value[i]]} if i < len(old) and i < len(value) else (old + value)[i]
                    for i in range(max(len(old), len(value)))
                ]
            elif key == "anyOf" and "anyOf" in out:
                pairs = [{"allOf": [a, b]} for a in out[key] for b in value]
                if len(pairs) > MAX_BRANCHES:
                    raise Refused(f"{ptr}/allOf", f"anyOf branches multiply past {MAX_BRANCHES}")
                out[key] = pairs
            elif key == "additionalProperties":
                continue  # below
            elif key in out and canonical(out[key]) != canonical(value):
                raise Refused(f"{ptr}/allOf", f"two different {key!r} in one allOf")
            else:
                out[key] = value
    if types is not None:
        if not types:
            raise NoValue(f"invalid JSON schema: {ptr}: allOf of types that no value has")
        out["type"] = sorted(types - {"integer"} if "number" in types else types)
    # Each part's additionalProperties applies to the properties that part does not declare.
    names = list(out.get("properties", {}))
    extras = []
    for part in flat:
        if "additionalProperties" in part and part["additionalProperties"] is not True:
            extra = part["additionalProperties"]
            extras.append(extra)
            for name in names:
                if name not in part.get("properties", {}):
                    out["properties"][name] = (
                        {"allOf": [out["properties"][name], extra]} if extra is not False else False
                    )
    if extras:
        out["additionalProperties"] = False if False in extras else {"allOf": extras}
    return out


def _expand(part: Json, ptr: str, resolve: Resolve, merging: set[str]) -> list[dict[str, Any]]:
    """``part`` as a list of schemas without $ref or allOf, all to hold."""
    if part is True:
        return []
    if part is False:
        raise NoValue(f"invalid JSON schema: {ptr}: allOf with false, which no value satisfies")
    out: list[dict[str, Any]] = []
    rest = {k: v for k, v in part.items() if k not in ("$ref", "allOf")}
    if rest:
        out.append(rest)
    if "$ref" in part:
        ref = part["$ref"]
        if ref in merging:
            raise Refused(f"{ptr}/$ref", "a recursive $ref inside allOf")
        out += _expand(resolve(ref, ptr), ptr, resolve, merging | {ref})
    for sub in part.get("allOf", []):
        out += _expand(sub, ptr, resolve, merging)
    return out
