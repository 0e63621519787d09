"""Checks of one recipe value each: a wrong type or an out-of-range value is a one-line error naming the key."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lowbit.errors import LowbitError

MAX_SEED = 2**32 - 1  # KMeans' random_state (numpy) takes no larger seed


def is_int(value: Any) -> bool:
    """Counts are real ints: YAML's ``true`` is an int to Python and ``12.0`` would be cast silently later."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: Any, what: str, lo: int, hi: int, *, null: bool = False) -> None:
    """An integer in ``[lo, hi]`` (or None with ``null``), named in one line when it is not."""
    if (null and value is None) or (is_int(value) and lo <= value <= hi):
        return
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(lo)
    rule = f"{kind} (at most {hi})" if kind else f"an integer from {lo} to {hi}"
    raise LowbitError(f"{what} must be {rule}{' or null' if null else ''}, got {value!r}")


def check_float(value: Any, what: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
           null: bool = False) -> None:
    """A finite number in the interval: YAML's ``.inf``/``.nan`` would be saved as Infinity/NaN and compute nan."""
    if null and value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    finite = number and (isinstance(value, int) or math.isfinite(value))  # an int is exact: no float(), no overflow
    if finite and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi):
        return
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise LowbitError(f"{what} must be a number in {interval}{' or null' if null else ''}, got {value!r}")


def check_bool(value: Any, what: str) -> None:
    """A switch is ``true``/``false``: ``1`` or ``"yes"`` would be truthy by accident."""
    if not isinstance(value, bool):
        raise LowbitError(f"{what} must be true or false, got {value!r}")


def check_choice(value: Any, what: str, options: tuple[str, ...]) -> None:
    """One of a fixed set of names, spelled exactly (a list or a number is no name)."""
    if not (isinstance(value, str) and value in options):
        raise LowbitError(f"{what} must be one of {', '.join(options)}, got {value!r}")


def check_str(value: Any, what: str) -> None:
    """Free text (name, description) must be text: ``name: 5`` is a number YAML read, not a name."""
    if not isinstance(value, str):
        raise LowbitError(f"{what} must be a string, got {value!r}")


def check_list(value: Any, what: str, rule: str, item_ok: Callable[[Any], bool], *, nonempty: bool = False) -> None:
    """A YAML list whose items all pass ``item_ok``: a bare string would otherwise be read letter by letter."""
    if not isinstance(value, list) or (nonempty and not value) or not all(item_ok(x) for x in value):
        raise LowbitError(f"{what} must be {rule}, got {value!r}")


def check_sites(value: Any, what: str, options: tuple[str, ...], *, nonempty: bool = False) -> None:
    """A list of linear-input site names."""
    rule = f"a {'non-empty ' if nonempty else ''}list of {', '.join(options)}"
    check_list(value, what, rule, lambda x: isinstance(x, str) and x in options, nonempty=nonempty)


def check_seed(value: Any, what: str) -> None:
    """Seeds are non-negative and fit every generator they reach (KMeans' is 32-bit)."""
    check_int(value, what, 0, MAX_SEED)
