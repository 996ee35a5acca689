"""An older registry gains the new tables and columns on open, on SQLite and on PostgreSQL alike, also when
several processes open it at the same moment (render nodes starting together against a team's registry)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.dialects import postgresql
from test_registry import OLD_SOURCES, V1_SCHEMA

from adapterzoo.zoo import db
from adapterzoo.zoo.models import Base

PG = postgresql.dialect()
OPENERS = 4
TRIALS = 3
# Each opener imports, says it is ready, waits for the go file (a start time), then opens registry i at start + i·GAP.
OPENER = """
import sys, time
from pathlib import Path
from adapterzoo.zoo import db
ready, go, urls = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
ready.touch()
while not go.exists():
    time.sleep(0.01)
start = float(go.read_text())
for i, url in enumerate(urls):
    time.sleep(max(0.0, start + i * {gap} - time.time()))
    db.connect(url).dispose()
"""
GAP = 0.5


def v1_statements(backend: str) -> list[str]:
    """The version-1 schema (files keyed by path) as db.py ran it on `backend`."""
    lines = V1_SCHEMA.read_text(encoding="utf-8").splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
    if backend == "sqlite":
        text = text.replace(db.IDENTITY_CLAUSE, "")
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def old_registry(url: str) -> None:
    """The registry as adapterzoo made it before files had locations, before sources had names, words and
    licences, and before unknown_files, in the database at `url`; with a file and its source in it."""
    engine = create_engine(url)
    backend = engine.dialect.name
    old_sources = OLD_SOURCES.replace("INTEGER PRIMARY KEY", "INTEGER" + db.IDENTITY_CLAUSE + " PRIMARY KEY")
    with engine.begin() as connection:
        for statement in v1_statements(backend):
            table = db.table_columns(statement)
            if table and table[0] == "sources":
                statement = old_sources if backend == "postgresql" else OLD_SOURCES
            if "unknown_files" in statement:
                continue
            connection.exec_driver_sql(statement)
        connection.execute(text(
            "INSERT INTO files (path, is_folder, size, mtime_ns, kind, base, tensors, metadata, details, warnings, "
            "trigger_words, unsafe, missing, first_seen, last_seen) VALUES ('/m', false, 1, 1, 'lora', 'sd1', 1, "
            "'{}', '{}', '[]', '[]', false, false, '2020-01-01', '2020-01-01')"))
        connection.execute(text("INSERT INTO sources (file_id, provider, civitai_version_id, created) "
                                "SELECT id, 'civitai', 7, '2020-01-01' FROM files"))
    engine.dispose()


def orm_differences(url: str) -> list[str]:
    """Where the tables at `url` differ from the ORM: tables, column order, types (as PostgreSQL spells them),
    nullability."""
    engine = create_engine(url)
    inspector = inspect(engine)
    problems = []
    if set(inspector.get_table_names()) != set(Base.metadata.tables):
        problems.append(f"tables {sorted(inspector.get_table_names())} != ORM {sorted(Base.metadata.tables)}")
    for name, table in Base.metadata.tables.items():
        reflected = {c["name"]: c for c in inspector.get_columns(name)} if name in inspector.get_table_names() else {}
        if list(reflected) != [c.name for c in table.columns]:
            problems.append(f"{name}: columns {list(reflected)} != ORM {[c.name for c in table.columns]}")
            continue
        for column in table.columns:
            found = reflected[column.name]
            if engine.dialect.name == "postgresql" and found["type"].compile(dialect=PG) != column.type.compile(PG):
                problems.append(f"{name}.{column.name}: {found['type']} != ORM {column.type}")
            if found["nullable"] != column.nullable and not column.primary_key:
                problems.append(f"{name}.{column.name}: nullable {found['nullable']} != ORM {column.nullable}")
    engine.dispose()
    return problems


def version_2_registry(url: str) -> None:
    """The registry as adapterzoo made it before locations had name_key (schema version 2), with a file at
    two paths in it."""
    db.connect(url).dispose()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO files (is_folder, size, sha256, kind, base, tensors, metadata, details, warnings, "
            "trigger_words, unsafe, first_seen, last_seen) VALUES (false, 1, 'aa', 'lora', 'sd1', 1, '{}', '{}', "
            "'[]', '[]', false, '2020-01-01', '2020-01-01')"))
        connection.execute(text(
            "INSERT INTO locations (file_id, host, path, size, mtime_ns, missing, first_seen, last_seen) "
            "SELECT id, 'h', p, 1, 1, false, '2020-01-01', '2020-01-01' FROM files, "
            "(SELECT '/m/Ink Wash.safetensors' AS p UNION ALL SELECT '/n/ÉTÉ') AS paths"))
        connection.execute(text("DROP INDEX ix_locations_host_name_key"))
        connection.execute(text("ALTER TABLE locations DROP COLUMN name_key"))
        connection.execute(text("UPDATE registry_meta SET value = '2' WHERE name = 'schema'"))
    engine.dispose()


def open_at_once(urls: list[str], tmp_path: Path) -> None:
    """OPENERS processes open each of `urls` at one moment (GAP apart), and all succeed."""
    go = tmp_path / "go"
    openers = [subprocess.Popen([sys.executable, "-c", OPENER.format(gap=GAP), str(tmp_path / f"ready{n}"), str(go),
                                 *urls], stderr=subprocess.PIPE, text=True) for n in range(OPENERS)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{n}").exists() for n in range(OPENERS)) and time.monotonic() < deadline:
        time.sleep(0.02)
    (tmp_path / "go.tmp").write_text(str(time.time() + 0.2))
    (tmp_path / "go.tmp").rename(go)
    errors = [opener.communicate(timeout=120)[1] for opener in openers]
    assert [opener.returncode for opener in openers] == [0] * OPENERS, errors


def more_databases(registry_db: str, tmp_path: Path, request) -> list[str]:
    """registry_db and TRIALS - 1 more new databases on its backend."""
    urls = [registry_db]
    for trial in range(1, TRIALS):
        urls.append(request.getfixturevalue("new_postgres_database")() if registry_db.startswith("postgresql")
                    else f"sqlite:///{tmp_path / f'zoo{trial}.db'}")
    return urls


def test_processes_opening_an_old_registry_at_once_all_upgrade_it(registry_db: str, tmp_path: Path,
                                                                  request) -> None:
    urls = more_databases(registry_db, tmp_path, request)  # old registries, each opened by every process at once
    for url in urls:
        old_registry(url)
        assert orm_differences(url) != []
    open_at_once(urls, tmp_path)
    for url in urls:
        assert orm_differences(url) == []
        engine = create_engine(url)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT civitai_version_id, model_name FROM sources")).all()
            locations = connection.execute(text("SELECT path, name_key FROM locations")).all()
        engine.dispose()
        assert [tuple(r) for r in rows] == [(7, None)]
        assert [tuple(r) for r in locations] == [("/m", "m")]  # the path became a location, once, and named


def test_processes_opening_a_version_2_registry_at_once_give_every_location_its_name_key(
        registry_db: str, tmp_path: Path, request) -> None:
    """Schema version 3: each location's file name in lower case (Python's, É too), what the library sorts by,
    filled in once under the schema lock, then its index made."""
    urls = more_databases(registry_db, tmp_path, request)
    for url in urls:
        version_2_registry(url)
        assert orm_differences(url) != []
    open_at_once(urls, tmp_path)
    for url in urls:
        assert orm_differences(url) == []
        engine = create_engine(url)
        with engine.connect() as connection:
            keys = connection.execute(text("SELECT path, name_key FROM locations ORDER BY path")).all()
            version = connection.execute(text("SELECT value FROM registry_meta WHERE name = 'schema'")).all()
            indexes = {i["name"] for i in inspect(connection).get_indexes("locations")}
        engine.dispose()
        assert [tuple(k) for k in keys] == [("/m/Ink Wash.safetensors", "ink wash.safetensors"), ("/n/ÉTÉ", "été")]
        assert [tuple(v) for v in version] == [("3",)] and "ix_locations_host_name_key" in indexes
