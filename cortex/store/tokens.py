"""Queries on the `tokens` table: only hashes go in and out, never a token itself."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .models import Token, utcnow
from .statements import StoreError
from .timing import Observer, timed


class TokenStore:
    """Stored API tokens over one engine; each call is one short transaction."""

    def __init__(self, engine: AsyncEngine, *, observe: Observer | None = None) -> None:
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.observe = observe

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self._sessions() as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {type(exc).__name__}") from exc

    async def create(self, *, user: str, token_hash: str, name: str = "") -> Token:
        async with self._tx() as session:
            token = Token(user=user, name=name, token_hash=token_hash, created_at=utcnow())
            session.add(token)
            await session.flush()
            return token

    async def all(self) -> list[Token]:
        """Every token, revoked ones included, oldest first (for `cortex token list`)."""
        async with self._tx() as session:
            return list((await session.scalars(select(Token).order_by(Token.id))).all())

    @timed
    async def find_active(self, token_hash: str) -> Token | None:
        """The unrevoked token with this hash. Read on every handshake: revocation is immediate."""
        query = select(Token).where(Token.token_hash == token_hash, Token.revoked_at.is_(None))
        async with self._tx() as session:
            return (await session.scalars(query.limit(1))).first()

    async def revoke(self, token_id: int) -> tuple[Token, bool] | None:
        """Mark a token revoked: (token, whether this call revoked it). None: no such token.

        Revoking twice keeps the first revocation time.
        """
        async with self._tx() as session:
            token = await session.get(Token, token_id)
            if token is None:
                return None
            if token.revoked_at is not None:
                return token, False
            token.revoked_at = utcnow()
            return token, True

    @timed
    async def touch(self, token_id: int) -> None:
        async with self._tx() as session:
            await session.execute(
                update(Token).where(Token.id == token_id).values(last_used_at=utcnow())
            )

    @timed
    async def count_active(self) -> int:
        query = select(func.count()).select_from(Token).where(Token.revoked_at.is_(None))
        async with self._tx() as session:
            return int((await session.scalar(query)) or 0)

    @timed
    async def revoked_among(self, token_ids: Collection[int]) -> set[int]:
        """Which of these ids are no longer valid (revoked, or deleted by hand)."""
        if not token_ids:
            return set()
        wanted = set(token_ids)
        query = select(Token.id).where(Token.id.in_(wanted), Token.revoked_at.is_(None))
        async with self._tx() as session:
            active = set((await session.scalars(query)).all())
        return wanted - active
