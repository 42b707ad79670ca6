"""The Alembic migrations create exactly the tables of ``tables.py`` on both backends, and the
newest migration can be undone and done again."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from otpgate.adapters.storage.migrate import downgrade, upgrade
from otpgate.adapters.storage.tables import metadata
from tests.conftest import Database


async def differences(database: Database) -> list[Any]:
    def compare(connection: Any) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        found: list[Any] = compare_metadata(context, metadata)
        return found

    async with database.sql() as conn:
        return await conn.run_sync(compare)


async def test_the_migrations_make_the_declared_schema(database: Database) -> None:
    assert await differences(database) == []


async def test_the_newest_migration_goes_down_and_up_again(database: Database) -> None:
    await downgrade(database.url, schema=database.schema, revision="0001")
    async with database.sql() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    assert version == "0001"
    await upgrade(database.url, schema=database.schema)
    assert await differences(database) == []
