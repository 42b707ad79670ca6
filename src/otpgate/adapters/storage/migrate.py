"""Alembic, driven from code: ``otpgate db upgrade`` and the embedded start-up call this."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

from otpgate.adapters.storage.engine import create_engine, is_sqlite

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


async def upgrade(url: str, *, schema: str = "", revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision`` (creating the PostgreSQL schema)."""
    engine = create_engine(url, schema=schema, pool_size=1)
    try:
        async with engine.begin() as conn:
            if schema and not is_sqlite(url):
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            await conn.run_sync(_upgrade_sync, revision)
    finally:
        await engine.dispose()


def _upgrade_sync(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def downgrade(url: str, *, schema: str = "", revision: str) -> None:
    """Take the database at ``url`` back down to ``revision`` (operators and tests)."""
    engine = create_engine(url, schema=schema, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade_sync, revision)
    finally:
        await engine.dispose()


def _downgrade_sync(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)
