"""Argument checks shared by the public functions: each names the argument it refuses.

``fit_precision``, ``train``, the Hugging Face mixin and the command line validate every
argument up front with these, so a wrong type or value is a :class:`~lalora_curv.LaloraError`
naming it, raised before any work (never a bare ``TypeError`` deep inside, or a silently odd
run: ``max_grad_norm=-1`` flipping the gradient, ``True`` read as one label draw).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

from lalora_curv.errors import LaloraError


def integer(
    name: str,
    value: Any,
    minimum: int | None = None,
    *,
    optional: bool = False,
    error: type[LaloraError] = LaloraError,
) -> int | None:
    """``value`` as an ``int`` (not a bool, not a float), ``>= minimum``.

    ``None`` passes when ``optional``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        kind = "an integer" + (" or None" if optional else "")
        raise error(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def number(
    name: str,
    value: Any,
    minimum: float | None = None,
    *,
    strict: bool = False,
    optional: bool = False,
    error: type[LaloraError] = LaloraError,
) -> float | None:
    """``value`` as a finite ``float`` (a real number, not a bool or a string), ``>= minimum``.

    ``> minimum`` when ``strict``; ``None`` passes when ``optional``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        kind = "a number" + (" or None" if optional else "")
        raise error(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise error(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
    return value


def boolean(name: str, value: Any, *, error: type[LaloraError] = LaloraError) -> bool:
    """``value`` if it is ``True`` or ``False``; anything else raises ``error`` naming ``name``."""
    if not isinstance(value, bool):
        raise error(f"{name} must be True or False, got {value!r}")
    return value


def string(
    name: str, value: Any, *, optional: bool = False, error: type[LaloraError] = LaloraError
) -> str | None:
    """``value`` as a non-empty string; ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise error(f"{name} must be a non-empty string, got {value!r}")
    return value


def choice(
    name: str, value: Any, options: Iterable[Any], *, error: type[LaloraError] = LaloraError
) -> Any:
    """``value`` if it is one of ``options``; anything else raises ``error`` listing them."""
    options = list(options)
    if value not in options:
        raise error(f"unknown {name} {value!r}; valid: {', '.join(map(str, options))}")
    return value


__all__ = ["boolean", "choice", "integer", "number", "string"]
