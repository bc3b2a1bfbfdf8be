"""Versioned migrations, applied at start by every service that owns tables.

Files live in services/common/data/migrations/<dialect>/NNNN_name.sql and are applied in
order, each in its own transaction, recorded in schema_migrations. Several processes
starting at once is safe: PostgreSQL takes an advisory lock, SQLite's BEGIN IMMEDIATE
serialises writers, and each process re-reads what is applied once it holds the lock.
"""

from __future__ import annotations

import logging
import pathlib
import re

from services.common.data.db.database import Database

log = logging.getLogger(__name__)

MIGRATIONS_DIR = pathlib.Path(__file__).resolve().parent.parent / "migrations"
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant works; it only has to be the same in every process.
_ADVISORY_LOCK_ID = 0x6465766F7073


def available(dialect: str) -> list[tuple[int, pathlib.Path]]:
    found = []
    for path in sorted((MIGRATIONS_DIR / dialect).glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append((int(match.group(1)), path))
    return found


def _statements(sql: str) -> list[str]:
    # Migration files keep one statement per `;` at a line end and comments on lines
    # of their own (dropped first, so a comment may end in `;`); no procedural bodies.
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*$", code, flags=re.MULTILINE) if s.strip()]


async def migrate(db: Database) -> list[int]:
    """A schema that is up to date is found with reads alone, so the services starting
    beside each other (or beside a running one) take no write lock for nothing."""
    wanted = available(db.dialect)
    if {version for version, _ in wanted} <= await _applied(db):
        return []
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    applied_now = []
    for version, path in wanted:
        async with db.transaction() as tx:
            if db.dialect == "postgresql":
                await tx.execute("SELECT pg_advisory_xact_lock($1)", _ADVISORY_LOCK_ID)
            if await tx.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", version):
                continue
            for statement in _statements(path.read_text()):
                await tx.execute(statement)
            await tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, CURRENT_TIMESTAMP)",
                version,
                path.stem,
            )
            applied_now.append(version)
            log.info("applied migration %s", path.name)
    return applied_now


async def _applied(db: Database) -> set[int]:
    try:
        return {int(row["version"]) for row in await db.fetch("SELECT version FROM schema_migrations")}
    except Exception:  # noqa: BLE001 - no table yet: nothing is applied
        return set()
