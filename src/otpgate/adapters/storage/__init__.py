"""Storage on SQLAlchemy Core: SQLite (embedded default) and PostgreSQL."""
