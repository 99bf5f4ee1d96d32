"""Alembic environment: runs online against the URL set by `dialoop.store.migrate`."""

from alembic import context

from dialoop.store.db import make_engine
from dialoop.store.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "dialoop.store.migrate sets sqlalchemy.url"

engine = make_engine(url)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
