"""The registry: tables made from registry.db.sql match the ORM, URL resolution, upserts, bad URLs."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import MetaData, create_engine, func, inspect, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.base import ischema_names as PG_TYPE_NAMES

from adapterzoo.cli import cli
from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo import db
from adapterzoo.zoo.models import Base, FileEntry
from adapterzoo.zoo.scan import _upsert, index_values
from adapterzoo.zoo.walk import Found

PG = postgresql.dialect()


def sqlite_affinity(declared: str) -> str:
    """SQLite's column affinity rules (https://sqlite.org/datatype3.html section 3.1), in order."""
    name = declared.upper()
    if "INT" in name:
        return "INTEGER"
    if any(s in name for s in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in name or not name:
        return "BLOB"
    if any(s in name for s in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def declared_types(path: Path, table: str) -> dict[str, str]:
    """Column types exactly as the SQL file spelled them, read back from SQLite."""
    with sqlite3.connect(path) as connection:
        return {row[1]: row[2] for row in connection.execute(f"PRAGMA table_info({table})")}


def schema_differences(database: Path, metadata: MetaData) -> list[str]:
    """Every way the tables in `database` (made from the SQL file) differ from the ORM metadata."""
    engine = create_engine(f"sqlite:///{database}")
    inspector = inspect(engine)
    problems: list[str] = []
    if set(inspector.get_table_names()) != set(metadata.tables):
        problems.append(f"tables {sorted(inspector.get_table_names())} != ORM {sorted(metadata.tables)}")
    for name, table in metadata.tables.items():
        if name not in inspector.get_table_names():
            continue
        reflected = {c["name"]: c for c in inspector.get_columns(name)}
        declared = declared_types(database, name)
        if list(reflected) != [c.name for c in table.columns]:
            problems.append(f"{name}: columns {list(reflected)} != ORM {[c.name for c in table.columns]}")
        for column in table.columns:
            if column.name not in reflected:
                continue
            sql_type = declared[column.name]
            orm_type = column.type.compile(dialect=engine.dialect)
            if sqlite_affinity(sql_type) != sqlite_affinity(orm_type):
                problems.append(f"{name}.{column.name}: SQLite affinity of {sql_type} != ORM {orm_type}")
            as_pg = PG_TYPE_NAMES[sql_type.lower()]().compile(dialect=PG)
            if as_pg != column.type.compile(dialect=PG):
                problems.append(f"{name}.{column.name}: on PostgreSQL {as_pg} != ORM {column.type.compile(dialect=PG)}")
            nullable = reflected[column.name]["nullable"] and not column.primary_key
            if nullable != column.nullable:
                problems.append(f"{name}.{column.name}: nullable {nullable} != ORM {column.nullable}")
        pk = inspector.get_pk_constraint(name)["constrained_columns"]
        if pk != [c.name for c in table.primary_key.columns]:
            problems.append(f"{name}: primary key {pk} != ORM {[c.name for c in table.primary_key.columns]}")
        indexes = {(i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(name)}
        orm_indexes = {(i.name, tuple(c.name for c in i.columns), bool(i.unique)) for i in table.indexes}
        if indexes != orm_indexes:
            problems.append(f"{name}: indexes only in SQL {indexes - orm_indexes}, only in ORM {orm_indexes - indexes}")
        fks = {(tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
               for f in inspector.get_foreign_keys(name)}
        orm_fks = {((f.parent.name,), f.column.table.name, (f.column.name,)) for f in table.foreign_keys}
        if fks != orm_fks:
            problems.append(f"{name}: foreign keys {fks} != ORM {orm_fks}")
    engine.dispose()
    return problems


@pytest.fixture
def schema_db(tmp_path: Path) -> Path:
    path = tmp_path / "schema.db"
    db.connect(f"sqlite:///{path}").dispose()
    return path


def test_tables_made_from_the_sql_file_match_the_orm(schema_db: Path) -> None:
    assert schema_differences(schema_db, Base.metadata) == []
    with sqlite3.connect(schema_db) as connection:
        assert {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")} == {
            "files", "sources", "verifications", "unknown_files", "ignored_updates"}


def test_schema_comparison_notices_a_drifted_orm(schema_db: Path) -> None:
    drifted = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["files"].c.error.nullable = False
    drifted.tables["files"].c.size.type = drifted.tables["files"].c.rank.type  # BIGINT -> INTEGER
    problems = schema_differences(schema_db, drifted)
    assert any("files.error: nullable" in p for p in problems)
    assert any("files.size: on PostgreSQL BIGINT != ORM INTEGER" in p for p in problems)


def test_sql_file_uses_portable_types_and_identity_only_outside_sqlite() -> None:
    text = db.SCHEMA_FILE.read_text()
    columns = re.findall(r"^\s+\w+\s+([A-Z][A-Z ]*?)(?:\s+(?:NOT NULL|GENERATED|PRIMARY|REFERENCES)|,|$)", text, re.M)
    assert len(columns) == sum(len(table.columns) for table in Base.metadata.tables.values())
    assert set(columns) <= {"INTEGER", "BIGINT", "TEXT", "BOOLEAN", "DOUBLE PRECISION", "TIMESTAMP"}
    assert "AUTOINCREMENT" not in text and "PRAGMA" not in text
    pg = db.schema_statements("postgresql")
    lite = db.schema_statements("sqlite")
    assert len(pg) == len(lite) == text.count(";")
    assert sum(db.IDENTITY_CLAUSE.strip() in s for s in pg) == 5
    assert not any("IDENTITY" in s for s in lite)


OLD_SOURCES = """CREATE TABLE sources (
    id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files (id), provider TEXT NOT NULL,
    civitai_model_id BIGINT, civitai_version_id BIGINT, hf_repo TEXT, download_url TEXT, created TIMESTAMP NOT NULL)"""


def test_a_registry_from_before_the_source_columns_opens_and_gains_them(tmp_path: Path) -> None:
    """A registry made before sources had names, words and licences, and before unknown_files."""
    path = old_registry(tmp_path / "old.db")
    with sqlite3.connect(path) as connection:
        connection.execute("INSERT INTO files (path, is_folder, size, mtime_ns, kind, base, tensors, metadata, details,"
                           " warnings, trigger_words, unsafe, missing, first_seen, last_seen) VALUES ('/m', 0, 1, 1,"
                           " 'lora', 'sd1', 1, '{}', '{}', '[]', '[]', 0, 0, '2020-01-01', '2020-01-01')")
        connection.execute("INSERT INTO sources (file_id, provider, civitai_version_id, created) "
                           "VALUES (1, 'civitai', 7, '2020-01-01')")
    assert "model_name" not in declared_types(path, "sources")
    db.connect(f"sqlite:///{path}").dispose()
    assert schema_differences(path, Base.metadata) == []
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT civitai_version_id, model_name FROM sources").fetchall() == [(7, None)]
    db.connect(f"sqlite:///{path}").dispose()  # a second open finds nothing left to add


def old_registry(path: Path) -> Path:
    """A registry made before sources had names, words and licences, and before unknown_files."""
    with sqlite3.connect(path) as connection:
        for statement in db.schema_statements("sqlite"):
            table = db.table_columns(statement)
            if table and table[0] == "sources":
                statement = OLD_SOURCES
            if (table and table[0] == "unknown_files") or "unknown_files" in statement:
                continue
            connection.execute(statement)
    return path


@pytest.mark.parametrize("made", ["new", "old"])
def test_connections_opening_one_registry_at_once_all_get_it(made: str, tmp_path: Path) -> None:
    """Two pulls or scans started together both open (create, upgrade, switch to WAL) the registry: none may
    fail with 'database is locked' because the other was doing so. A race, so it is run many times."""
    failures = []

    def open_it(url: str, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            db.connect(url).dispose()
        except AdapterzooError as exc:
            failures.append(str(exc))

    for trial in range(40):
        path = tmp_path / f"zoo{trial}.db"
        if made == "old":
            old_registry(path)
        barrier = threading.Barrier(4)
        threads = [threading.Thread(target=open_it, args=(f"sqlite:///{path}", barrier)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert schema_differences(path, Base.metadata) == []


def test_registry_url_prefers_option_then_env_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry_home: Path
) -> None:
    assert db.registry_url() == f"sqlite:///{registry_home}/registry.db"
    assert registry_home.is_dir()
    monkeypatch.setenv("ADAPTERZOO_DB", "sqlite:////elsewhere/env.db")
    assert db.registry_url() == "sqlite:////elsewhere/env.db"
    assert db.registry_url("postgresql://u@h/zoo") == "postgresql://u@h/zoo"
    assert db.registry_url(str(tmp_path / "plain.db")) == f"sqlite:///{tmp_path}/plain.db"
    monkeypatch.delenv("ADAPTERZOO_DB")
    monkeypatch.delenv("ADAPTERZOO_HOME")
    monkeypatch.setattr(db, "user_data_dir", lambda app: str(tmp_path / "data" / app))
    assert db.registry_url() == f"sqlite:///{tmp_path}/data/adapterzoo/registry.db"


def test_db_option_and_env_choose_the_registry_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = CliRunner()
    result = runner.invoke(cli, ["--db", f"sqlite:///{tmp_path / 'by_option.db'}", "list"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "by_option.db").is_file()
    monkeypatch.setenv("ADAPTERZOO_DB", f"sqlite:///{tmp_path / 'by_env.db'}")
    assert runner.invoke(cli, ["scan", str(empty)]).exit_code == 0
    assert (tmp_path / "by_env.db").is_file()
    assert not (tmp_path / "home" / "registry.db").exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://user@localhost/zoo", "supports sqlite and postgresql"),
        ("no such://place", "not a database URL"),
        ("sqlite:////no/such/folder/zoo.db", "cannot open the registry"),
    ],
)
def test_bad_registry_url_is_one_line_and_exit_1(url: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(AdapterzooError, match=expected):
        db.connect(url)
    run = subprocess.run(
        [sys.executable, "-m", "adapterzoo", "--db", url, "list"], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 1
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr


def test_sqlite_registry_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    engine = db.connect(f"sqlite:///{tmp_path / 'z.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.BUSY_TIMEOUT_S * 1000
    engine.dispose()


def test_upsert_keeps_id_and_first_seen_and_overwrites_the_rest(tmp_path: Path) -> None:
    model = tmp_path / "m.bin"
    model.write_bytes(b"not a pickle at all")
    engine = db.connect(f"sqlite:///{tmp_path / 'z.db'}")
    values = index_values(Found(model, False, 19, 1, frozenset()))
    first = _upsert(engine, values, datetime(2020, 1, 1))
    second = _upsert(engine, {**values, "size": 20, "kind": "lora"}, datetime(2021, 1, 1))
    with engine.connect() as connection:
        rows = connection.execute(select(FileEntry.id, FileEntry.size, FileEntry.kind, FileEntry.first_seen,
                                         FileEntry.last_seen)).all()
        assert connection.execute(select(func.count()).select_from(FileEntry)).scalar() == 1
    assert first == second
    assert rows == [(first, 20, "lora", datetime(2020, 1, 1), datetime(2021, 1, 1))]
    engine.dispose()


@pytest.mark.skipif(not os.environ.get("ADAPTERZOO_TEST_POSTGRES"), reason="set ADAPTERZOO_TEST_POSTGRES to a URL")
def test_postgresql_registry_from_the_same_sql_file(tmp_path: Path) -> None:
    """Runs only against a PostgreSQL you point it at; the schema there must match the ORM too."""
    url = os.environ["ADAPTERZOO_TEST_POSTGRES"]
    engine = db.connect(url)
    inspector = inspect(engine)
    for name, table in Base.metadata.tables.items():
        reflected = {c["name"]: c for c in inspector.get_columns(name)}
        assert list(reflected) == [c.name for c in table.columns]
        for column in table.columns:
            assert reflected[column.name]["type"].compile(dialect=PG) == column.type.compile(dialect=PG)
            assert reflected[column.name]["nullable"] == column.nullable
    model = tmp_path / "m.bin"
    model.write_bytes(b"not a pickle at all")
    values = index_values(Found(model, False, 19, 1, frozenset()))
    assert _upsert(engine, values, datetime(2020, 1, 1)) == _upsert(engine, values, datetime(2021, 1, 1))
    engine.dispose()
