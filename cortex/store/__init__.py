"""Persistence: SQLAlchemy 2 async tables, the engine, and every query Cortex runs."""

from .db import make_engine, migrate
from .repo import Store

__all__ = ["Store", "make_engine", "migrate"]
