"""The registry: tables made from registry.db.sql match the ORM, URL resolution, upserts, bad URLs."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import MetaData, create_engine, inspect, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.base import ischema_names as PG_TYPE_NAMES

from adapterzoo.cli import cli
from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo import db
from adapterzoo.zoo.contents import upsert_content
from adapterzoo.zoo.models import Base, FileEntry
from adapterzoo.zoo.scan import index_values
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
            orm_pg = column.type.compile(dialect=PG).replace(db.BINARY_COLLATION, "")  # SQLite's file lacks it
            if as_pg != orm_pg:
                problems.append(f"{name}.{column.name}: on PostgreSQL {as_pg} != ORM {orm_pg}")
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
            "registry_meta", "files", "roots", "root_mounts", "locations", "events", "sources", "verifications",
            "unknown_files", "ignored_updates", "verify_jobs"}


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
    columns = re.findall(r"^\s+\w+\s+([A-Z][A-Z ]*?)(?:\s+(?:NOT NULL|GENERATED|PRIMARY|REFERENCES|COLLATE \"C\")|,|$)",
                         text, re.M)
    assert len(columns) == sum(len(table.columns) for table in Base.metadata.tables.values())
    assert set(columns) <= {"INTEGER", "BIGINT", "TEXT", "BOOLEAN", "DOUBLE PRECISION", "TIMESTAMP"}
    assert "AUTOINCREMENT" not in text and "PRAGMA" not in text
    pg = db.schema_statements("postgresql")
    lite = db.schema_statements("sqlite")
    assert len(pg) == len(lite) == text.count(";")
    assert sum(db.IDENTITY_CLAUSE.strip() in s for s in pg) == len(Base.metadata.tables) - 1  # all but registry_meta
    assert not any("IDENTITY" in s for s in lite)
    assert set(re.findall(r"COLLATE \"?\w+\"?", text)) == {db.BINARY_COLLATION.strip()}  # code point order,
    assert any(db.BINARY_COLLATION in s for s in pg) and not any("COLLATE" in s for s in lite)  # SQLite's own


V1_SCHEMA = Path(__file__).parent / "fixtures" / "registry_v1.sql"  # registry.db.sql before files had locations
OLD_SOURCES = """CREATE TABLE sources (
    id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files (id), provider TEXT NOT NULL,
    civitai_model_id BIGINT, civitai_version_id BIGINT, hf_repo TEXT, download_url TEXT, created TIMESTAMP NOT NULL)"""


def v1_statements() -> list[str]:
    """The version-1 schema as db.py ran it on SQLite: files keyed by path."""
    text = "\n".join(line for line in V1_SCHEMA.read_text().splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in text.replace(db.IDENTITY_CLAUSE, "").split(";") if s.strip()]


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
    """A version-1 registry (files keyed by path) made before sources had names, words and licences, and
    before unknown_files."""
    with sqlite3.connect(path) as connection:
        for statement in v1_statements():
            table = db.table_columns(statement)
            if table and table[0] == "sources":
                statement = OLD_SOURCES
            if (table and table[0] == "unknown_files") or "unknown_files" in statement:
                continue
            connection.execute(statement)
    return path


def file_row(connection: sqlite3.Connection, path: str, sha: str | None, missing: int = 0, folder: int = 0,
             words: str = "[]") -> int:
    """A version-1 files row."""
    return connection.execute(
        "INSERT INTO files (path, is_folder, size, mtime_ns, sha256, autov2, kind, base, tensors, metadata, details,"
        " warnings, trigger_words, preview_path, unsafe, missing, first_seen, last_seen) VALUES (?, ?, 10, 5, ?, ?,"
        " 'lora', 'sd1', 1, '{}', '{}', '[]', ?, ?, 0, ?, '2020-01-01 00:00:00', '2021-01-01 00:00:00')",
        (path, folder, sha, sha and sha[:10], words, path + ".png", missing)).lastrowid


def library_of_v1(path: Path) -> dict[str, int]:
    """An old registry holding one LoRA twice (A1111 and ComfyUI copies; the ComfyUI one went missing), with a
    source on one row and a verification on the other, a folder (no SHA-256 then) and a file of its own."""
    old_registry(path)
    with sqlite3.connect(path) as connection:
        ids = {"a1111": file_row(connection, "/sd/webui/models/Lora/style.safetensors", "aa" * 32,
                                 words='["ohwx", "ink"]'),
               "comfy": file_row(connection, "/sd/ComfyUI/models/loras/style.safetensors", "aa" * 32, missing=1,
                                 words='["ink", "wash"]'),
               "folder": file_row(connection, "/sd/ComfyUI/models/diffusers/tiny", None, folder=1),
               "other": file_row(connection, "/sd/webui/models/Lora/other.safetensors", "bb" * 32)}
        connection.execute("INSERT INTO sources (file_id, provider, civitai_version_id, created) "
                           "VALUES (?, 'civitai', 7, '2020-01-01')", (ids["a1111"],))
        connection.execute("INSERT INTO verifications (file_id, checkpoint, verdict, created) "
                           "VALUES (?, '/ck', 'pass', '2020-01-02')", (ids["comfy"],))
    return ids


def test_an_old_registry_keyed_by_path_becomes_files_with_locations_and_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18 §2: its paths become locations of this host; rows with one SHA-256 become one file with every
    location, its sources and verifications re-pointed; the folder keeps its row; nothing is lost."""
    monkeypatch.setenv("ADAPTERZOO_HOST", "studio")
    path = tmp_path / "old.db"
    ids = library_of_v1(path)
    db.connect(f"sqlite:///{path}").dispose()
    assert schema_differences(path, Base.metadata) == []
    with sqlite3.connect(path) as connection:
        files = connection.execute("SELECT id, sha256, trigger_words FROM files ORDER BY id").fetchall()
        locations = connection.execute("SELECT file_id, host, path, size, mtime_ns, preview_path, missing, "
                                       "missing_since FROM locations ORDER BY path").fetchall()
        sources = connection.execute("SELECT file_id, civitai_version_id FROM sources").fetchall()
        verifications = connection.execute("SELECT file_id, verdict FROM verifications").fetchall()
        version = connection.execute("SELECT value FROM registry_meta WHERE name = 'schema'").fetchall()
        name_keys = dict(connection.execute("SELECT path, name_key FROM locations").fetchall())
    assert files == [(ids["a1111"], "aa" * 32, '["ohwx", "ink", "wash"]'), (ids["folder"], None, "[]"),
                     (ids["other"], "bb" * 32, "[]")]
    by_path = {row[2]: row for row in locations}
    assert len(locations) == 4
    assert {by_path[p][0] for p in ("/sd/webui/models/Lora/style.safetensors",
                                    "/sd/ComfyUI/models/loras/style.safetensors")} == {ids["a1111"]}
    assert by_path["/sd/ComfyUI/models/diffusers/tiny"][0] == ids["folder"]
    assert by_path["/sd/webui/models/Lora/other.safetensors"][0] == ids["other"]
    assert {row[1] for row in locations} == {"studio"}
    assert by_path["/sd/ComfyUI/models/loras/style.safetensors"][6:] == (1, "2021-01-01 00:00:00")
    assert by_path["/sd/webui/models/Lora/style.safetensors"][3:7] == (
        10, 5, "/sd/webui/models/Lora/style.safetensors.png", 0)
    assert sources == [(ids["a1111"], 7)] and verifications == [(ids["a1111"], "pass")]
    assert version == [("3",)]
    assert name_keys == {"/sd/webui/models/Lora/style.safetensors": "style.safetensors",  # version 3's
                         "/sd/ComfyUI/models/loras/style.safetensors": "style.safetensors",
                         "/sd/ComfyUI/models/diffusers/tiny": "tiny",
                         "/sd/webui/models/Lora/other.safetensors": "other.safetensors"}
    result = CliRunner().invoke(cli, ["--db", str(path), "list", "--json"])
    assert result.exit_code == 0, result.output
    listed = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert listed["style.safetensors"]["path"] == "/sd/webui/models/Lora/style.safetensors"  # the present copy
    assert listed["style.safetensors"]["verified"] == "pass" and len(listed["style.safetensors"]["locations"]) == 2
    db.connect(f"sqlite:///{path}").dispose()  # a second open finds nothing left to do
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT COUNT(*) FROM locations").fetchone() == (4,)


def test_processes_opening_an_old_registry_at_once_migrate_it_once(tmp_path: Path) -> None:
    """Four processes open the same old registry together: each waits for the one that migrates, none fails,
    and every path is a location once."""
    path = tmp_path / "old.db"
    library_of_v1(path)
    runs = [subprocess.Popen([sys.executable, "-m", "adapterzoo", "--db", str(path), "list", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [r.communicate(timeout=120) for r in runs]
    assert [r.returncode for r in runs] == [0] * 4, [err for _, err in outputs]
    assert all(len(json.loads(out)) == 3 for out, _ in outputs)
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT COUNT(*), COUNT(DISTINCT path) FROM locations").fetchone() == (4, 4)
        assert connection.execute("SELECT COUNT(*) FROM files").fetchone() == (3,)


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


def test_one_content_is_one_row_its_id_and_first_seen_kept(tmp_path: Path) -> None:
    model = tmp_path / "m.bin"
    model.write_bytes(b"not a pickle at all")
    engine = db.connect(f"sqlite:///{tmp_path / 'z.db'}")
    values = index_values(Found(model, False, 19, 1, frozenset()))
    with engine.begin() as connection:
        first = upsert_content(connection, values, datetime(2020, 1, 1))
    with engine.begin() as connection:
        second = upsert_content(connection, {**values, "kind": "lora"}, datetime(2021, 1, 1))
    with engine.connect() as connection:
        rows = connection.execute(select(FileEntry.id, FileEntry.kind, FileEntry.first_seen,
                                         FileEntry.last_seen)).all()
    assert first == second
    assert rows == [(first, "lora", datetime(2020, 1, 1), datetime(2021, 1, 1))]
    engine.dispose()


def test_postgresql_registry_from_the_same_sql_file(tmp_path: Path, postgres_url: str) -> None:
    """The schema PostgreSQL makes from registry.db.sql must match the ORM too."""
    engine = db.connect(postgres_url)
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
    with engine.begin() as connection:
        ids = [upsert_content(connection, values, datetime(2020 + i, 1, 1)) for i in range(2)]
    assert ids[0] == ids[1]
    engine.dispose()
