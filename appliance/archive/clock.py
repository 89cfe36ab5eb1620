"""The archive's one clock: local time with its offset, as written in the index and records."""

from __future__ import annotations

import datetime as dt


def now_local() -> dt.datetime:
    return dt.datetime.now().astimezone()
