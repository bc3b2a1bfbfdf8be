"""Database access shared by the services: one small interface over two engines."""

from services.common.data.db.database import Database, UniqueViolation, connect

__all__ = ["Database", "UniqueViolation", "connect"]
