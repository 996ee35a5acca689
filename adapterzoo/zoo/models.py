"""ORM classes over the tables that registry.db.sql creates; that file, not this one, makes them."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    Text,
    and_,
    case,
    exists,
    false,
    or_,
    select,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from adapterzoo.zoo.hosts import SHARED_HOST, current_host, translate

HASH_COLUMNS = ("sha256", "autov1", "autov2", "autov3", "blake3", "crc32")


class JSONText(TypeDecorator):
    """JSON kept in a TEXT column, so SQLite and PostgreSQL store the same thing the same way."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else json.dumps(value, default=str, ensure_ascii=False)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)


class Base(DeclarativeBase):
    pass


class FileEntry(Base):
    """One content: a file's bytes or a diffusers/PEFT folder's files, wherever they live (`locations`).
    See registry.db.sql for what each column means. `path` and `status` are as this host sees them."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ux_files_sha256", "sha256", unique=True),
        Index("ix_files_kind", "kind"),
        Index("ix_files_base", "base"),
        *(Index(f"ix_files_{name}", name) for name in HASH_COLUMNS if name != "sha256"),
        Index("ix_files_size", "size"),
        Index("ix_files_first_seen", "first_seen"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    is_folder: Mapped[bool] = mapped_column(Boolean)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(Text)
    autov1: Mapped[str | None] = mapped_column(Text)
    autov2: Mapped[str | None] = mapped_column(Text)
    autov3: Mapped[str | None] = mapped_column(Text)
    blake3: Mapped[str | None] = mapped_column(Text)
    crc32: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    base: Mapped[str] = mapped_column(Text)
    format: Mapped[str | None] = mapped_column(Text)
    rank: Mapped[int | None] = mapped_column(Integer)
    alpha: Mapped[float | None] = mapped_column(Double)
    dtype: Mapped[str | None] = mapped_column(Text)
    tensors: Mapped[int] = mapped_column(Integer)
    file_metadata: Mapped[dict[str, str]] = mapped_column("metadata", JSONText)
    details: Mapped[dict[str, Any]] = mapped_column(JSONText)
    warnings: Mapped[list[str]] = mapped_column(JSONText)
    trigger_words: Mapped[list[str]] = mapped_column(JSONText)
    error: Mapped[str | None] = mapped_column(Text)
    unsafe: Mapped[bool] = mapped_column(Boolean)
    first_seen: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime)

    locations: Mapped[list[Location]] = relationship(lazy="selectin", order_by="Location.path")

    def reachable(self, host: str | None = None) -> list[tuple[Location, str]]:
        """(location, its path on `host`) for every location `host` can reach, present ones first."""
        host = host or current_host()
        pairs = [(loc, local) for loc in self.locations if (local := loc.local_path(host)) is not None]
        return sorted(pairs, key=lambda pair: (pair[0].missing, pair[1]))

    def _shown(self, host: str) -> tuple[Location | None, str | None]:
        """The location a one-line view names: the first present one here, then a missing one here, then
        any other host's (by its stored path)."""
        reachable = self.reachable(host)
        if reachable:
            return reachable[0]
        other = sorted(self.locations, key=lambda loc: (loc.missing, loc.host, loc.path))
        return (other[0], other[0].path) if other else (None, None)

    @hybrid_property
    def path(self) -> str | None:
        """This host's path of the file (see `_shown`); None for a content no location holds any more. In SQL
        (select, where, order by): the first of this host's and shared locations, present ones first, as stored."""
        return self._shown(current_host())[1]

    @path.inplace.expression
    @classmethod
    def _path_expression(cls) -> Any:
        first = (select(Location.path).where(Location.file_id == cls.id,
                                             Location.host.in_([current_host(), SHARED_HOST]))
                 .order_by(Location.missing, Location.path).limit(1).correlate_except(Location).scalar_subquery())
        return case((cls.id.is_not(None), first))  # names files.id itself: `select(FileEntry.path)` reads files

    @hybrid_property
    def missing(self) -> bool:
        """True unless this host has a present location of it (in SQL too)."""
        return self.is_missing(current_host())

    @missing.inplace.expression
    @classmethod
    def _missing_expression(cls) -> Any:
        host = current_host()
        mounted = select(RootMount.root_id).where(RootMount.host == host)
        present = exists().where(Location.file_id == cls.id, Location.missing.is_(False),
                                 or_(Location.host == host, and_(Location.host == SHARED_HOST,
                                                                 Location.root_id.in_(mounted)))
                                 ).correlate_except(Location)
        return and_(cls.id.is_not(None), ~present)  # names files.id itself, as `path` does

    def is_missing(self, host: str) -> bool:
        return not any(not loc.missing for loc, _ in self.reachable(host))

    @property
    def status(self) -> str:
        return self.status_on(current_host())

    def status_on(self, host: str) -> str:
        """One word for tables: missing (gone from here), elsewhere (only another host has it), unsafe,
        broken or ok."""
        if self.is_missing(host):
            others = any(not loc.missing and loc.local_path(host) is None for loc in self.locations)
            return "elsewhere" if others else "missing"
        if self.unsafe:
            return "unsafe"
        return "broken" if self.error else "ok"

    @property
    def preview_path(self) -> str | None:
        return self.preview_on(current_host())

    def preview_on(self, host: str) -> str | None:
        """The image beside the copy `host` sees (see `_shown`), else beside any copy."""
        shown, _ = self._shown(host)
        if shown is not None and shown.preview_path:
            return shown.preview_path
        return next((loc.preview_path for loc in self.locations if loc.preview_path), None)

    def to_json(self, host: str | None = None) -> dict[str, Any]:
        """The object list/show/scan print: `path` is as `host` (default: this one) sees the file."""
        host = host or current_host()
        shown, path = self._shown(host)
        return {
            "id": self.id,
            "path": path,
            "name": os.path.basename(path) if path else None,
            "kind": self.kind,
            "base": self.base,
            "format": self.format,
            "rank": self.rank,
            "alpha": self.alpha,
            "dtype": self.dtype,
            "tensors": self.tensors,
            **{name: getattr(self, name) for name in HASH_COLUMNS},
            "size": self.size,
            "mtime_ns": shown.mtime_ns if shown else None,
            "is_folder": self.is_folder,
            "status": self.status_on(host),
            "error": self.error,
            "unsafe": self.unsafe,
            "missing": self.is_missing(host),
            "trigger_words": self.trigger_words,
            "preview_path": self.preview_on(host),
            "metadata": self.file_metadata,
            "details": self.details,
            "warnings": self.warnings,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "host": shown.host if shown else None,
            "locations": [loc.to_json(host) for loc in sorted(self.locations, key=lambda loc: (loc.host, loc.path))],
        }


class Root(Base):
    """A folder `scan` rescans: a UI's install or one of its model folders; host '*' when shared."""

    __tablename__ = "roots"
    __table_args__ = (Index("ux_roots_host_path", "host", "path", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    layout: Mapped[str] = mapped_column(Text)
    kind: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(Text)
    added: Mapped[datetime] = mapped_column(DateTime)

    mounts: Mapped[list[RootMount]] = relationship(lazy="selectin", order_by="RootMount.host")

    def local_path(self, host: str) -> str | None:
        """Where `host` finds this root: its own path, or its mount of a shared one; None if it has none."""
        if self.host == host:
            return self.path
        if self.host == SHARED_HOST:
            return next((m.path for m in self.mounts if m.host == host), None)
        return None


class RootMount(Base):
    """Where one host mounts a shared root."""

    __tablename__ = "root_mounts"
    __table_args__ = (Index("ux_root_mounts_root_id_host", "root_id", "host", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    root_id: Mapped[int] = mapped_column(Integer, ForeignKey("roots.id"))
    host: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)


def name_key(path: str) -> str:
    """What the library sorts a location by: the last part of its stored path, in lower case (Python's own
    lower-casing, so SQL compares what Python would). Every write of a location's path writes this too."""
    return path.rpartition("/")[2].lower()


def _name_key_default(context: Any) -> str | None:
    """locations.name_key of an INSERT that does not give it: from the row's path."""
    path = context.get_current_parameters().get("path")
    return None if path is None else name_key(path)


class Location(Base):
    """Where a file's content lives: a path on one host (or on a shared root), with what a rescan compares."""

    __tablename__ = "locations"
    __table_args__ = (
        Index("ux_locations_host_path", "host", "path", unique=True),
        Index("ix_locations_file_id", "file_id"),
        Index("ix_locations_inode", "inode"),
        Index("ix_locations_host_name_key", "host", "name_key", "file_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[int] = mapped_column(Integer, ForeignKey("files.id"))
    host: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    inode: Mapped[int | None] = mapped_column(BigInteger)
    device: Mapped[int | None] = mapped_column(BigInteger)
    root_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("roots.id"))
    preview_path: Mapped[str | None] = mapped_column(Text)
    missing: Mapped[bool] = mapped_column(Boolean)
    missing_since: Mapped[datetime | None] = mapped_column(DateTime)
    first_seen: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime)
    name_key: Mapped[str | None] = mapped_column(Text(collation="C"), default=_name_key_default)  # name_key(path)

    root: Mapped[Root | None] = relationship(lazy="selectin")

    def local_path(self, host: str) -> str | None:
        """This location's path on `host`, or None when `host` cannot reach it."""
        if self.host == host:
            return self.path
        if self.host == SHARED_HOST and self.root is not None:
            mount = self.root.local_path(host)
            return translate(self.path, self.root.path, mount) if mount is not None else None
        return None

    def to_json(self, host: str) -> dict[str, Any]:
        local = self.local_path(host)
        root = self.root
        return {
            "host": self.host, "path": local or self.path, "here": local is not None, "stored_path": self.path,
            "root": {"id": root.id, "path": root.local_path(host) or root.path, "layout": root.layout,
                     "kind": root.kind} if root is not None else None,
            "size": self.size, "mtime_ns": self.mtime_ns, "missing": self.missing,
            "missing_since": self.missing_since.isoformat() if self.missing_since else None,
            "preview_path": self.preview_path,
            "first_seen": self.first_seen.isoformat(), "last_seen": self.last_seen.isoformat(),
        }


class Source(Base):
    """Where a file came from (Civitai version, Hub repo, URL); filled by pull and enrich."""

    __tablename__ = "sources"
    __table_args__ = (
        Index("ix_sources_file_id", "file_id"),
        Index("ix_sources_civitai_version_id", "civitai_version_id"),
        Index("ix_sources_provider_file_id", "provider", "file_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[int] = mapped_column(Integer, ForeignKey("files.id"))
    provider: Mapped[str] = mapped_column(Text)
    civitai_model_id: Mapped[int | None] = mapped_column(BigInteger)
    civitai_version_id: Mapped[int | None] = mapped_column(BigInteger)
    hf_repo: Mapped[str | None] = mapped_column(Text)
    download_url: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime)
    hf_revision: Mapped[str | None] = mapped_column(Text)
    hf_path: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(Text)
    version_name: Mapped[str | None] = mapped_column(Text)
    trained_words: Mapped[list[str] | None] = mapped_column(JSONText)
    base_stated: Mapped[str | None] = mapped_column(Text)
    base: Mapped[str | None] = mapped_column(Text)
    allow_commercial_use: Mapped[list[str] | None] = mapped_column(JSONText)
    allow_derivatives: Mapped[bool | None] = mapped_column(Boolean)
    allow_no_credit: Mapped[bool | None] = mapped_column(Boolean)
    nsfw: Mapped[bool | None] = mapped_column(Boolean)
    file_name: Mapped[str | None] = mapped_column(Text)
    preview_path: Mapped[str | None] = mapped_column(Text)
    creator: Mapped[str | None] = mapped_column(Text)

    def to_json(self) -> dict[str, Any]:
        return {c.name: getattr(self, c.name) for c in self.__table__.columns if c.name not in ("id", "file_id")}


class UnknownFile(Base):
    """A file (by SHA-256) a provider said it does not know, and when we asked."""

    __tablename__ = "unknown_files"
    __table_args__ = (Index("ux_unknown_files_provider_sha256", "provider", "sha256", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(Text)
    asked: Mapped[datetime] = mapped_column(DateTime)


class IgnoredUpdate(Base):
    """A Civitai model or version that `updates` no longer offers (`updates ignore`)."""

    __tablename__ = "ignored_updates"
    __table_args__ = (Index("ux_ignored_updates_target", "provider", "target", "remote_id", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)
    remote_id: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(DateTime)


class Verification(Base):
    """One verify run of a file on a checkpoint: verdict and reasons, coverage, effects, grid, parameters."""

    __tablename__ = "verifications"
    __table_args__ = (Index("ix_verifications_file_id", "file_id"), Index("ix_verifications_file_id_id", "file_id", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[int] = mapped_column(Integer, ForeignKey("files.id"))
    checkpoint: Mapped[str] = mapped_column(Text)
    verdict: Mapped[str] = mapped_column(Text)
    coverage: Mapped[float | None] = mapped_column(Double)
    effect: Mapped[float | None] = mapped_column(Double)
    grid_path: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime)
    checkpoint_sha256: Mapped[str | None] = mapped_column(Text)
    reasons: Mapped[list[str]] = mapped_column(JSONText, server_default="[]")
    coverage_detail: Mapped[dict[str, Any] | None] = mapped_column(JSONText)
    effects: Mapped[list[dict[str, Any]]] = mapped_column(JSONText, server_default="[]")
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONText, server_default="{}")
    seconds: Mapped[float | None] = mapped_column(Double)
    version: Mapped[str | None] = mapped_column(Text)
    quick: Mapped[bool] = mapped_column(Boolean, server_default=false())

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "verdict": self.verdict,
            "quick": self.quick,
            "reasons": self.reasons,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "coverage": self.coverage_detail,
            "effects": self.effects,
            "grid": self.grid_path,
            "parameters": self.parameters,
            "version": self.version,
            "seconds": self.seconds,
            "created": self.created.isoformat(),
        }


class Event(Base):
    """Something that happened to a file on disk: a move a scan saw, an rm, a prune, a dedupe, an organize step
    (written `planned` before its files move: the journal a rerun finishes)."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_file_id", "file_id"), Index("ix_events_state", "state"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[datetime] = mapped_column(DateTime)
    host: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text)
    file_id: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str | None] = mapped_column(Text)
    new_path: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONText)

    def to_json(self) -> dict[str, Any]:
        return {c.name: getattr(self, c.name) for c in self.__table__.columns}


class RegistryMeta(Base):
    """Facts about the registry itself; 'schema' is the version of its data layout (zoo/migrate.py)."""

    __tablename__ = "registry_meta"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class VerifyJob(Base):
    """One file to verify on one checkpoint with one set of settings, shared by `verify --registry --worker`
    processes; zoo/verify_queue.py takes, leases and finishes them."""

    __tablename__ = "verify_jobs"
    __table_args__ = (
        Index("ux_verify_jobs_digest", "digest", unique=True),
        Index("ix_verify_jobs_take", "state", "checkpoint_sha256", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(Text)
    file_id: Mapped[int] = mapped_column(Integer, ForeignKey("files.id"))
    checkpoint: Mapped[str] = mapped_column(Text)
    checkpoint_sha256: Mapped[str] = mapped_column(Text)
    settings: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    crashes: Mapped[int] = mapped_column(Integer)
    verification_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("verifications.id"))
    queued: Mapped[datetime] = mapped_column(DateTime)
    started: Mapped[datetime | None] = mapped_column(DateTime)
    finished: Mapped[datetime | None] = mapped_column(DateTime)
