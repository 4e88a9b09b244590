"""Persistence: SQLAlchemy 2 async tables, the engine, and every query Cortex runs."""

from .engine import make_engine, migrate
from .repo import Store
from .tokens import TokenStore

__all__ = ["Store", "TokenStore", "make_engine", "migrate"]
