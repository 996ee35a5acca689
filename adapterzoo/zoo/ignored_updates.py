"""The Civitai models and versions `updates` no longer offers (`updates ignore` / `unignore`), kept in the registry."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.models import IgnoredUpdate, Source

PROVIDER = "civitai"
FORMS = "civitai:VERSION_ID or VERSION_ID for one version, civitai:model/MODEL_ID or model/MODEL_ID for a whole model"


@dataclass(frozen=True)
class Ignored:
    """One entry of the list: a whole model or one version, by its Civitai id."""

    target: str  # model | version
    remote_id: int

    @property
    def ref(self) -> str:
        """The REF a user types for it: the same words `pull` takes."""
        return f"civitai:model/{self.remote_id}" if self.target == "model" else f"civitai:{self.remote_id}"


def parse_target(text: str) -> Ignored:
    """`civitai:model/5`, `model/5` -> model 5; `civitai:7`, `7` -> version 7 (pull's REF words)."""
    body = text.strip().removeprefix("civitai:")
    if body.isdigit():
        return Ignored("version", int(body))
    if body.startswith("model/") and body[6:].isdigit():
        return Ignored("model", int(body[6:]))
    raise AdapterzooError(f"not a Civitai model or version: {text!r} (give {FORMS})")


def ignored(engine: Engine) -> list[Ignored]:
    """The whole list, models first, by id."""
    with Session(engine) as session:
        rows = session.scalars(select(IgnoredUpdate).where(IgnoredUpdate.provider == PROVIDER)
                               .order_by(IgnoredUpdate.target, IgnoredUpdate.remote_id))
        return [Ignored(row.target, row.remote_id) for row in rows]


def ignore(engine: Engine, targets: list[Ignored]) -> list[tuple[Ignored, bool]]:
    """Add each target; returns (target, whether it is new to the list)."""
    added = []
    for target in targets:
        try:
            with Session(engine) as session, session.begin():
                session.add(IgnoredUpdate(provider=PROVIDER, target=target.target, remote_id=target.remote_id,
                                          created=datetime.now(timezone.utc).replace(tzinfo=None)))
            added.append((target, True))
        except IntegrityError:  # on the list already (the unique index says so, also under a race)
            added.append((target, False))
    return added


def unignore(engine: Engine, targets: list[Ignored]) -> None:
    """Remove every target, or none when one of them is not on the list."""
    present = set(ignored(engine))
    absent = [t.ref for t in targets if t not in present]
    if absent:
        raise AdapterzooError(f"not on the ignore list: {', '.join(absent)}; nothing was changed")
    with Session(engine) as session, session.begin():
        for target in targets:
            session.execute(delete(IgnoredUpdate).where(
                IgnoredUpdate.provider == PROVIDER, IgnoredUpdate.target == target.target,
                IgnoredUpdate.remote_id == target.remote_id))


def looks_like_a_model(engine: Engine, target: Ignored) -> str | None:
    """The name of the registry's Civitai model whose id a bare VERSION_ID equals (and no version's does): the
    user likely meant `model/ID`. None otherwise."""
    if target.target != "version":
        return None
    with Session(engine) as session:
        if session.scalar(select(Source.id).where(Source.civitai_version_id == target.remote_id).limit(1)):
            return None
        row = session.execute(select(Source.model_name).where(Source.civitai_model_id == target.remote_id)
                              .limit(1)).first()
    return None if row is None else (row[0] or f"model {target.remote_id}")
