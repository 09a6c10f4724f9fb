"""The one timestamp format of artifacts and logs: UTC, to the second, ISO 8601."""

from __future__ import annotations

import datetime as _dt


def utc_now() -> str:
    """``YYYY-MM-DDTHH:MM:SS+00:00``, now."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
