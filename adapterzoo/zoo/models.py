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
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

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
    """One indexed file or diffusers/PEFT folder; see registry.db.sql for what each column means."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ux_files_path", "path", unique=True),
        Index("ix_files_kind", "kind"),
        Index("ix_files_base", "base"),
        *(Index(f"ix_files_{name}", name) for name in HASH_COLUMNS),
        Index("ix_files_size", "size"),
        Index("ix_files_first_seen", "first_seen"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    is_folder: Mapped[bool] = mapped_column(Boolean)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
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
    preview_path: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    unsafe: Mapped[bool] = mapped_column(Boolean)
    missing: Mapped[bool] = mapped_column(Boolean)
    first_seen: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime)

    @property
    def status(self) -> str:
        """One word for tables: missing, unsafe, broken or ok."""
        if self.missing:
            return "missing"
        if self.unsafe:
            return "unsafe"
        return "broken" if self.error else "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "name": os.path.basename(self.path),
            "kind": self.kind,
            "base": self.base,
            "format": self.format,
            "rank": self.rank,
            "alpha": self.alpha,
            "dtype": self.dtype,
            "tensors": self.tensors,
            **{name: getattr(self, name) for name in HASH_COLUMNS},
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "is_folder": self.is_folder,
            "status": self.status,
            "error": self.error,
            "unsafe": self.unsafe,
            "missing": self.missing,
            "trigger_words": self.trigger_words,
            "preview_path": self.preview_path,
            "metadata": self.file_metadata,
            "details": self.details,
            "warnings": self.warnings,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
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

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "verdict": self.verdict,
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
