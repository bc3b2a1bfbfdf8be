"""The wall clock that stamps rows, events and leases: timezone-aware UTC, so that
SQLite's text and PostgreSQL's timestamptz read back as the same instant."""

from __future__ import annotations

import datetime as dt


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
