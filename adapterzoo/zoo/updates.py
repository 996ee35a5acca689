"""`updates`: newer versions on Civitai of the models whose files the registry holds.

Civitai is asked once per 100 models (`GET /models?ids=...`). A version is yours when a registry file came
from it or has the SHA-256 of one of its files; only versions Civitai lists above the newest of yours are
offered, less early access (unless asked), other bases (with same_base) and the ignore list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from adapterzoo.zoo import civitai
from adapterzoo.zoo.ignored_updates import ignored
from adapterzoo.zoo.models import FileEntry, Source
from adapterzoo.zoo.queries import paths_by_sha256


@dataclass(frozen=True)
class Held:
    """A registry file (still on disk) with a Civitai source."""

    model_id: int
    version_id: int | None
    model_name: str | None
    version_name: str | None
    base_stated: str | None
    kind: str
    path: str


@dataclass
class Offer:
    """A newer version than yours: what `pull civitai:VERSION` would fetch."""

    version_id: int
    version_name: str | None
    base: str  # our vocabulary
    base_stated: str | None  # Civitai's words
    published: str | None
    size: int | None  # bytes of the primary file
    file_name: str | None
    early_access: bool
    early_access_ends: str | None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pull": f"adapterzoo pull civitai:{self.version_id}"}


@dataclass
class ModelUpdates:
    """One Civitai model you hold files of; status: update | up to date | ignored | not found."""

    model_id: int
    model_name: str | None
    kind: str
    status: str
    yours: dict[str, Any]  # version_id, version_name, base, base_stated, paths
    newer: list[Offer] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_name": self.model_name, "kind": self.kind, "status": self.status,
                "yours": self.yours, "newer": [o.to_json() for o in self.newer]}


def find_updates(engine: Engine, same_base: bool = False, include_early_access: bool = False,
                 client: civitai.CivitaiClient | None = None) -> list[ModelUpdates]:
    """Every Civitai model of the registry with what it offers beyond your newest version, by model name.
    Reads the registry only; network failures raise AdapterzooError before anything is returned."""
    held: dict[int, list[Held]] = {}
    for row in _held(engine):
        held.setdefault(row.model_id, []).append(row)
    skipped = ignored(engine)
    ignored_models = {i.remote_id for i in skipped if i.target == "model"}
    ignored_versions = {i.remote_id for i in skipped if i.target == "version"}
    wanted = [m for m in held if m not in ignored_models]
    models = {m["id"]: m for m in (client or civitai.CivitaiClient()).models_by_id(wanted)} if wanted else {}
    digests = [sha for model in models.values() for version in model.get("modelVersions") or []
               for sha in _sha256s(version)]
    registered = paths_by_sha256(engine, digests)
    now = datetime.now(timezone.utc)
    results = []
    for model_id, rows in held.items():
        newest = max(rows, key=lambda r: r.version_id or 0)
        if model_id in ignored_models or model_id not in models:
            results.append(ModelUpdates(model_id, newest.model_name, newest.kind,
                                        "ignored" if model_id in ignored_models else "not found",
                                        _yours_from_registry(newest, rows)))
            continue
        model = models[model_id]
        listed = model.get("modelVersions") or []
        mine = [i for i, v in enumerate(listed) if _is_yours(v, rows, registered)]
        if mine:
            yours = _yours_from_civitai(listed[mine[0]], rows, registered)
            newer = listed[:mine[0]]  # Civitai lists a model's versions newest first
        else:  # your version is no longer listed: newer ones are those with higher ids
            yours = _yours_from_registry(newest, rows)
            newer = [v for v in listed if v["id"] > (newest.version_id or 0)]
        bases = {_base_key(listed[i].get("baseModel")) for i in mine} | {_base_key(r.base_stated) for r in rows}
        offers = [_offer(v, now) for v in newer if v["id"] not in ignored_versions]
        offers = [o for o in offers if (include_early_access or not o.early_access)
                  and (not same_base or _base_key(o.base_stated) in bases)]
        results.append(ModelUpdates(model_id, model.get("name") or newest.model_name,
                                    civitai.kind_of(model.get("type")) if model.get("type") else newest.kind,
                                    "update" if offers else "up to date", yours, offers))
    return sorted(results, key=lambda r: ((r.model_name or "").lower(), r.model_id))


def _held(engine: Engine) -> list[Held]:
    """Registry files on disk whose source is a Civitai model."""
    statement = (select(Source.civitai_model_id, Source.civitai_version_id, Source.model_name, Source.version_name,
                        Source.base_stated, FileEntry.kind, FileEntry.path)
                 .join(FileEntry, FileEntry.id == Source.file_id)
                 .where(Source.provider == "civitai", Source.civitai_model_id.is_not(None),
                        FileEntry.missing.is_(False))
                 .order_by(FileEntry.path))
    with Session(engine) as session:
        return [Held(*row) for row in session.execute(statement)]


def _sha256s(version: dict[str, Any]) -> list[str]:
    return [sha for f in version.get("files") or [] if (sha := civitai.file_sha256(f))]


def _is_yours(version: dict[str, Any], rows: list[Held], registered: dict[str, list[str]]) -> bool:
    return any(r.version_id == version["id"] for r in rows) or any(s in registered for s in _sha256s(version))


def _yours_from_civitai(version: dict[str, Any], rows: list[Held], registered: dict[str, list[str]]) -> dict[str, Any]:
    paths = {r.path for r in rows if r.version_id == version["id"]}
    paths.update(p for sha in _sha256s(version) for p in registered.get(sha, []))
    return {"version_id": version["id"], "version_name": version.get("name"),
            "base": civitai.base_of(version.get("baseModel")), "base_stated": version.get("baseModel"),
            "paths": sorted(paths)}


def _yours_from_registry(newest: Held, rows: list[Held]) -> dict[str, Any]:
    return {"version_id": newest.version_id, "version_name": newest.version_name,
            "base": civitai.base_of(newest.base_stated), "base_stated": newest.base_stated,
            "paths": sorted({r.path for r in rows if r.version_id == newest.version_id})}


def _offer(version: dict[str, Any], now: datetime) -> Offer:
    primary = civitai.primary_file(version) or {}
    return Offer(version["id"], version.get("name"), civitai.base_of(version.get("baseModel")),
                 version.get("baseModel"), civitai.published(version), civitai.file_size(primary),
                 primary.get("name"), civitai.in_early_access(version, now), version.get("earlyAccessEndsAt"))


def _base_key(stated: str | None) -> str:
    """Civitai's base words in our vocabulary ('Pony' and 'SDXL 1.0' are both sdxl); words we do not map
    compare as they are."""
    base = civitai.base_of(stated)
    return stated or "unknown" if base == "unknown" else base
