"""An ops input's SHA-256 for provenance, from the registry when a scan already hashed the unchanged file.

Hashing a 2–7 GB checkpoint takes seconds of a core, as long as merging into it. The registry keeps
each scanned file's SHA-256 with the size and mtime it was hashed at (DESIGN.md: hashes are cached by
path, size, mtime), so such a file is not read again. A registry that does not exist is not created,
and one that cannot be read only means the file is hashed.

`hash_in_background` starts on the inputs as soon as the command line is parsed: on two cores the
hashing then overlaps Python importing torch and the rest, which leave the second core idle.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.hashing import sha256_of

LOOKUP_FROM_BYTES = 64 << 20  # a smaller file hashes in less time than opening the registry takes


def provenance_sha256(path: str | os.PathLike, db: str | None = None,
                      stop: threading.Event | None = None) -> str | dict[str, str]:
    """`zoo.hashing.sha256_of(path)`, taken from the registry at `db` (as --db) for a large scanned file;
    `stop`, once set, ends the hashing with an error."""
    path = Path(path)
    if path.is_file() and path.stat().st_size >= LOOKUP_FROM_BYTES:
        known = registered_sha256(path, db)
        if known is not None:
            return known
    return sha256_of(path, stop=stop)


def hash_in_background(paths: Iterable[str | os.PathLike], db: str | None = None,
                       stop: threading.Event | None = None) -> Callable[[Path], str | dict]:
    """`provenance_sha256` of `paths`, worked out one after the other in a daemon thread started now (an
    error exit does not wait for it); the returned function waits for a path's digest, or hashes any other.
    Setting `stop` ends the thread's work: a command run in-process (tests) is not ended by a process exit."""
    futures: dict[Path, Future] = {Path(path): Future() for path in paths}

    def work() -> None:
        for path, future in futures.items():
            try:
                if stop is not None and stop.is_set():  # not even the registry is opened any more
                    raise AdapterzooError(f"hashing {path} was stopped")
                future.set_result(provenance_sha256(path, db, stop))
            except BaseException as exc:  # noqa: BLE001 - raised where the digest is asked for
                future.set_exception(exc)

    threading.Thread(target=work, name="provenance-sha256", daemon=True).start()

    def sha256(path: Path) -> str | dict[str, str]:
        future = futures.get(Path(path))
        return provenance_sha256(path, db) if future is None else future.result()

    return sha256


def registered_sha256(path: Path, db: str | None = None) -> str | None:
    """The SHA-256 a scan recorded for `path`, if its size and mtime are still those it was hashed at."""
    # Imported here: sqlalchemy adds 0.3 s to the start of every ops command, and only large inputs get here.
    from sqlalchemy import and_, or_, select
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from adapterzoo.zoo.db import connect, registry_url
    from adapterzoo.zoo.hosts import current_host
    from adapterzoo.zoo.models import FileEntry, Location
    from adapterzoo.zoo.roots import load_places

    url = make_url(registry_url(db))
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).is_file()):
        return None
    stat = path.stat()
    try:
        engine = connect(url.render_as_string(hide_password=False))
    except AdapterzooError:
        return None
    try:
        places = load_places(engine, current_host())
        stored = [places.stored(p)[:2] for p in {str(path.absolute()), str(path.resolve())}]
        query = select(FileEntry.sha256).join(Location, Location.file_id == FileEntry.id).where(
            or_(*(and_(Location.host == host, Location.path == where) for host, where in stored)),
            Location.size == stat.st_size,
            Location.mtime_ns == stat.st_mtime_ns,
            Location.missing.is_(False),
            FileEntry.sha256.is_not(None),
            FileEntry.is_folder.is_(False),
        )
        with Session(engine) as session:
            return session.scalars(query).first()
    except SQLAlchemyError:
        return None
    finally:
        engine.dispose()
