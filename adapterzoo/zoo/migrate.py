"""Data migrations: what ALTER TABLE ADD COLUMN cannot do when the registry's layout changes.

registry_meta's 'schema' row holds the layout version. db.connect runs `migrate` under the schema lock
(SQLite's write lock, PostgreSQL's advisory lock), after the new tables and columns exist and before the
indexes: so two processes opening an old registry at once migrate it once, and the second finds it done.

Version 2: a file is its content, its paths are locations. A registry keyed by path gets one location of
this host per row, rows with one SHA-256 become one file with several locations (sources, verifications
re-pointed), and the columns that moved to locations are dropped. Nothing else changes; nothing is lost.

Version 3: every location gets its name_key (models.name_key: the file name in lower case, the library's name
order), computed here in Python as every writer computes it.
"""

from __future__ import annotations

from sqlalchemy import (Boolean, Connection, bindparam, case, column, insert, inspect, literal, null, select, table,
                        update)
from sqlalchemy.types import BigInteger, DateTime, Text

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.contents import duplicate_groups, merge_into
from adapterzoo.zoo.hosts import current_host
from adapterzoo.zoo.models import Location, RegistryMeta, name_key

SCHEMA_VERSION = 3
LOCATIONS = Location.__table__
NAME_BATCH = 5000  # locations per executemany while filling name_key
META = RegistryMeta.__table__
MOVED_TO_LOCATIONS = ("path", "mtime_ns", "preview_path", "missing")  # files columns of version 1
OLD_INDEXES = ("ux_files_path", "ix_files_sha256")  # version 1's; version 2 keys files by a unique SHA-256


def schema_version(connection: Connection) -> int | None:
    """The registry's layout version; None for a registry made before versions were kept (or a new one)."""
    if not inspect(connection).has_table(META.name):
        return None
    value = connection.execute(select(META.c.value).where(META.c.name == "schema")).scalar()
    return int(value) if value is not None else None


def needed(connection: Connection) -> bool:
    """Whether `migrate` has work to do. A registry from a newer adapterzoo is refused, never downgraded."""
    version = schema_version(connection)
    if version is not None and version > SCHEMA_VERSION:
        raise AdapterzooError(f"this registry has layout version {version}, newer than this adapterzoo knows "
                              f"({SCHEMA_VERSION}): upgrade adapterzoo")
    return version != SCHEMA_VERSION


def migrate(connection: Connection) -> None:
    """Bring the data up to SCHEMA_VERSION (in the caller's locked transaction)."""
    if not needed(connection):
        return
    _files_to_locations(connection)
    _name_keys(connection)
    if connection.execute(update(META).where(META.c.name == "schema").values(value=str(SCHEMA_VERSION))).rowcount:
        return
    connection.execute(insert(META).values(name="schema", value=str(SCHEMA_VERSION)))


def _files_to_locations(connection: Connection) -> None:
    """Version 1 -> 2; a new registry has no `files.path` and nothing to move."""
    present = {c["name"] for c in inspect(connection).get_columns("files")}
    if "path" not in present:
        return
    old = table("files", column("id"), column("path", Text), column("size", BigInteger),
                column("first_seen", DateTime), column("last_seen", DateTime),
                *(column(name, kind) for name, kind in (("mtime_ns", BigInteger), ("preview_path", Text),
                                                         ("missing", Boolean)) if name in present))
    missing = old.c.missing if "missing" in present else literal(False)
    columns = {
        "file_id": old.c.id, "host": literal(current_host()), "path": old.c.path, "size": old.c.size,
        "mtime_ns": old.c.mtime_ns if "mtime_ns" in present else literal(0),
        "preview_path": old.c.preview_path if "preview_path" in present else null(),
        "missing": missing, "missing_since": case((missing.is_(True), old.c.last_seen), else_=null()),
        "first_seen": old.c.first_seen, "last_seen": old.c.last_seen, "name_key": null(),  # _name_keys fills it
    }
    connection.execute(insert(LOCATIONS).from_select(list(columns), select(*columns.values())))
    for ids in duplicate_groups(connection):
        merge_into(connection, ids[0], ids[1:])
    for name in OLD_INDEXES:
        connection.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
    for name in MOVED_TO_LOCATIONS:
        if name in present:
            connection.exec_driver_sql(f"ALTER TABLE files DROP COLUMN {name}")


def _name_keys(connection: Connection) -> None:
    """Version 2 -> 3: name_key for every location without one (all of them in a version-2 registry, and those
    version 1's paths just became)."""
    rows = connection.execute(select(LOCATIONS.c.id, LOCATIONS.c.path).where(LOCATIONS.c.name_key.is_(None))).all()
    fill = update(LOCATIONS).where(LOCATIONS.c.id == bindparam("lid")).values(name_key=bindparam("key"))
    for start in range(0, len(rows), NAME_BATCH):
        connection.execute(fill, [{"lid": lid, "key": name_key(path)} for lid, path in rows[start:start + NAME_BATCH]])
