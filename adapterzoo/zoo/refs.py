"""REF strings (what `pull` and zoo.lock.json name a file by) to RemoteFile, and registry sources back to REFs.

civitai:VERSION_ID | civitai:model/MODEL_ID | a civitai.com model page | hf:OWNER/REPO/PATH[@REV] | an http(s) URL
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.models import Source
from adapterzoo.zoo.remote import RemoteFile, SourceRecord

REF_FORMS = "civitai:VERSION_ID, civitai:model/MODEL_ID, a civitai.com model URL, hf:OWNER/REPO/PATH[@REV] or a URL"


def resolve_ref(ref: str, token: str | None = None) -> RemoteFile:
    """What `ref` names: download URL, expected name, size and SHA-256, and the source's record.

    `token` is a Civitai API token (else CIVITAI_API_TOKEN); Hub tokens come from HF_TOKEN.
    """
    from adapterzoo.zoo import civitai, hub

    ref = ref.strip()
    if ref.startswith("civitai:") or (_is_url(ref) and civitai.is_civitai_url(ref)):
        return civitai.CivitaiClient(token=token).resolve(ref)
    if ref.startswith("hf:"):
        return hub.resolve(ref)
    if _is_url(ref):
        return RemoteFile(ref=ref, download_url=ref, file_name=None, size=None, sha256=None,
                          source=SourceRecord(provider="url", download_url=ref))
    raise AdapterzooError(f"not a reference: {ref!r} (give {REF_FORMS})")


def locked_remote(entry: dict[str, Any]) -> RemoteFile:
    """What a lock file entry names, from the entry alone (no network), for a file taken from a mirror: the
    source record holds what the REF says (Civitai version, Hub repo, path and commit, or the URL), enough for
    `lock` to name it again; `enrich` adds the rest."""
    from adapterzoo.zoo import hub

    ref = entry["ref"]
    record = SourceRecord(provider="url", download_url=ref if _is_url(ref) else None, kind=entry["kind"],
                          file_name=entry["file_name"])
    if ref.startswith("civitai:") and ref.removeprefix("civitai:").isdigit():
        record = replace(record, provider="civitai", civitai_version_id=int(ref.removeprefix("civitai:")))
    elif ref.startswith("hf:"):
        repo, path, revision = hub.parse_ref(ref)
        record = replace(record, provider="hf", hf_repo=repo, hf_path=path, hf_revision=revision)
    return RemoteFile(ref=ref, download_url=record.download_url or "", file_name=entry["file_name"],
                      size=entry["size"], sha256=entry["sha256"], source=record)


def ref_of(source: Source) -> str | None:
    """The REF that names the same file again: pinned to the version or commit it came from."""
    if source.provider == "civitai" and source.civitai_version_id:
        return f"civitai:{source.civitai_version_id}"
    if source.provider == "hf" and source.hf_repo and source.hf_path:
        return f"hf:{source.hf_repo}/{source.hf_path}" + (f"@{source.hf_revision}" if source.hf_revision else "")
    return source.download_url


def _is_url(ref: str) -> bool:
    parts = urlsplit(ref)
    return parts.scheme in ("http", "https") and bool(parts.netloc)
