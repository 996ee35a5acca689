"""A team mirror: files kept by their SHA-256 in a shared folder, or that folder behind any plain HTTP(S)
server. `pull --lock --mirror` takes a file from it before Civitai or the Hub; `lock --mirror` fills it
from the registry.

Layout, content-addressed as git's objects/ and Docker's registry blobs are (two hex digits of fan-out keep
every folder small; `sha256/` leaves room for another hash):

    <mirror>/sha256/<first two hex digits>/<all 64 hex digits>
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy import Engine

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.download import Downloaded, bring_in, download
from adapterzoo.zoo.http_get import Host, shown_url
from adapterzoo.zoo.queries import file_on_disk

MIRROR = Host("the mirror")


def blob_path(sha256: str) -> str:
    """Where a file with this SHA-256 lives under a mirror's root (folder or URL)."""
    return f"sha256/{sha256[:2]}/{sha256}"


@dataclass(frozen=True)
class Mirror:
    """A mirror folder (`location` a path) or server (`location` an http(s) URL)."""

    location: str

    @classmethod
    def at(cls, location: str) -> Mirror:
        """The mirror at a URL or an existing folder; anything else is one line."""
        if urlsplit(location).scheme in ("http", "https"):
            return cls(location.rstrip("/"))
        if not Path(location).is_dir():
            raise AdapterzooError(f"mirror {location} is not a folder (give a folder or an http(s) URL)")
        return cls(str(Path(location).absolute()))

    @property
    def is_url(self) -> bool:
        return urlsplit(self.location).scheme in ("http", "https")

    @property
    def shown(self) -> str:
        """The location fit to print: a URL without a password or query in it."""
        return shown_url(self.location) if self.is_url else self.location

    def fetch(self, sha256: str, size: int | None, name: str, folder: Path, progress_bar: bool = False,
              session: requests.Session | None = None) -> Downloaded:
        """The file with this SHA-256 put into `folder` as `name`, checked by SHA-256; AdapterzooError when the
        mirror lacks it or holds other bytes under its name (nothing is kept then)."""
        if self.is_url:  # the download engine: .part, resume, hashed as it arrives, refused on a wrong hash
            return download(f"{self.location}/{blob_path(sha256)}", folder, size=size, sha256=sha256, name=name,
                            host=MIRROR, progress_bar=progress_bar, session=session)
        path = Path(self.location) / blob_path(sha256)
        if not path.is_file():
            raise AdapterzooError(f"the mirror has no such file: {path}")
        return bring_in(path, folder, name, sha256, "its name in the mirror")


@dataclass
class Stocked:
    """What `lock --mirror` did with one file: added (linked or copied), present, or why not (no copy, damaged)."""

    sha256: str | None
    file_name: str
    status: str  # added | present | no copy | damaged | failed
    path: str | None = None
    linked: bool = False
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mirror_folder(root: Path) -> Path:
    """`root` if `stock` may fill it: a folder, or a new one inside a folder that exists (a typo in the path
    must not build a tree somewhere). Checked before any work."""
    if root.exists() and not root.is_dir():
        raise AdapterzooError(f"mirror {root} is not a folder")
    if not root.parent.is_dir():
        raise AdapterzooError(f"cannot make the mirror {root}: {root.parent} is not a folder")
    return root


def stock(engine: Engine, root: Path, entries: list[dict[str, Any]]) -> list[Stocked]:
    """Put the file of every lock entry into the mirror folder `root` (see mirror_folder): hard-linked from the
    registry's copy where the filesystem allows, else copied, hashed on the way in. A file already there is
    kept when its size is right and reported damaged when not."""
    root.mkdir(exist_ok=True)
    done: list[Stocked] = []
    seen: set[str] = set()
    for entry in entries:
        sha256, name = entry["sha256"], entry["file_name"]
        if not sha256:
            done.append(Stocked(None, name, "no copy", reason="a folder has no single SHA-256"))
            continue
        if sha256 in seen:
            continue
        seen.add(sha256)
        target = root / blob_path(sha256)
        if target.exists():
            fits = target.stat().st_size == entry["size"]
            done.append(Stocked(sha256, name, "present" if fits else "damaged", str(target),
                                reason=None if fits else f"{target.stat().st_size} bytes, not {entry['size']}: "
                                                         f"delete it and run again"))
            continue
        known = file_on_disk(engine, sha256)
        if known is None:
            done.append(Stocked(sha256, name, "no copy", reason="no unchanged copy on disk in the registry"))
            continue
        try:
            placed = bring_in(Path(known.path), target.parent, target.name, sha256, "the registry")
        except AdapterzooError as exc:
            done.append(Stocked(sha256, name, "failed", reason=str(exc)))
            continue
        linked = os.path.samefile(placed.path, known.path)
        done.append(Stocked(sha256, name, "added", str(placed.path), linked=linked))
    return done
