"""The copy window: "before midnight, so the morning backup jobs are undisturbed"."""

from __future__ import annotations

import datetime as dt


def parse_window(text: str) -> tuple[dt.time, dt.time] | None:
    """None for "always", else (start, end); a window may wrap past midnight."""
    if text.strip().lower() == "always":
        return None
    try:
        start, end = (dt.datetime.strptime(part.strip(), "%H:%M").time() for part in text.split("-"))
    except ValueError:
        raise ValueError('use "HH:MM-HH:MM" (e.g. "19:00-23:59") or "always"') from None
    return start, end


def in_window(text: str, now: dt.datetime | None = None) -> bool:
    window = parse_window(text)
    if window is None:
        return True
    start, end = window
    moment = (now or dt.datetime.now()).time()
    if start <= end:
        return start <= moment <= end
    return moment >= start or moment <= end
