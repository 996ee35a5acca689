"""What a source says about a file it offers: the record the registry keeps and what a download needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SourceRecord:
    """Where a file comes from and what its source states about it (a row of the `sources` table)."""

    provider: str  # civitai | hf | url
    download_url: str | None = None
    civitai_model_id: int | None = None
    civitai_version_id: int | None = None
    hf_repo: str | None = None
    hf_revision: str | None = None  # the commit sha the file was resolved at
    hf_path: str | None = None  # the file's path inside the repo
    model_name: str | None = None
    version_name: str | None = None
    kind: str = "unknown"  # our vocabulary, mapped from the source's type
    base: str = "unknown"  # our vocabulary, mapped from the base the source states
    base_stated: str | None = None  # the source's own words, e.g. Civitai's "SDXL 1.0" or "Pony"
    trained_words: list[str] = field(default_factory=list)
    allow_commercial_use: list[str] | None = None
    allow_derivatives: bool | None = None
    allow_no_credit: bool | None = None
    nsfw: bool | None = None
    file_name: str | None = None
    preview_url: str | None = None
    creator: str | None = None  # who published it: Civitai's creator, the Hub repo's owner

    def columns(self) -> dict[str, Any]:
        """The values for a `sources` row (everything but id, file_id, created, preview_path)."""
        values = asdict(self)
        del values["kind"], values["preview_url"]
        return values


@dataclass
class RemoteFile:
    """One file a REF resolves to: where to download it and what to check the bytes against.

    `info` is the source's own JSON for the file's version (Civitai's model-version body, written
    as `<name>.civitai.info`); None for the Hub and plain URLs.
    """

    ref: str  # the canonical REF: civitai:VERSION_ID, hf:OWNER/REPO/PATH@COMMIT, or the URL
    download_url: str
    file_name: str | None  # None for a plain URL: the server's Content-Disposition names it
    size: int | None
    sha256: str | None  # lowercase hex, as the source claims it
    source: SourceRecord
    info: dict[str, Any] | None = None
