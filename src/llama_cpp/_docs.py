"""Docstrings kept in one place: a facade method documented by the component it delegates to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def documented_by(source: Callable[..., Any]) -> Callable[[F], F]:
    """Give the decorated method ``source``'s docstring (the contract lives with the code)."""

    def decorate(method: F) -> F:
        method.__doc__ = source.__doc__
        return method

    return decorate
