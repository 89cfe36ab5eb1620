"""Typed, checked settings fields: what every section of the configuration is made of.

Each field carries a check function (returning why a value is wrong, or
None) and a one-line `doc`; the loader in appliance.config applies the checks
and names the file and key in its errors. Kept apart from the loader so each
feature can declare its own section without importing the whole registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any


def check_ae_title(value: str) -> str | None:
    if not value.strip():
        return "an AE title must not be empty"
    if len(value) > 16:
        return f"an AE title has at most 16 characters, this one has {len(value)}"
    if not value.isascii() or "\\" in value or any(ord(c) < 32 for c in value):
        return "an AE title uses printable ASCII characters without backslash"
    return None


def check_port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "a TCP port is a number from 1 to 65535"


def check_positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def check_not_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def check_ae_titles(value: tuple[str, ...]) -> str | None:
    for title in value:
        problem = check_ae_title(title)
        if problem:
            return f"{title!r}: {problem}"
    return None


def check_name(value: str) -> str | None:
    ok = value and all(c.isalnum() or c in "-_." for c in value) and len(value) <= 32
    return None if ok else "1-32 letters, digits, '-', '_' or '.'"


def check_nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def check_window(value: str) -> str | None:
    from appliance.disks.window import parse_window

    try:
        parse_window(value)
    except ValueError as exc:
        return str(exc)
    return None


def checked(default: Any, check: Callable[[Any], str | None] | None = None, doc: str = ""):
    """A dataclass field with a validation function and a one-line description."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata={"check": check, "doc": doc})
