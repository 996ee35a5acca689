"""The Hugging Face Hub through huggingface_hub (SOURCES.md section 2): search and `hf:` REF resolution.

huggingface_hub reads HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE itself; we never build Hub URLs by hand
except through its `hf_hub_url`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.model.registry import families
from adapterzoo.zoo.http_get import check_reachable
from adapterzoo.zoo.remote import RemoteFile, SourceRecord

KIND_TAGS = {"lora": "lora", "embedding": "textual_inversion"}
SORTS = {"downloads": "downloads", "rating": "likes", "newest": "created_at"}
# Known file names first, then any single-file weights, largest first.
PRIMARY_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "learned_embeds.safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
BASE_HINTS = tuple(hint for family in families() for hint in family.hub_hints)  # in detection order


def parse_ref(ref: str) -> tuple[str, str, str | None]:
    """`hf:OWNER/REPO/PATH[@REV]` -> (repo id, path in the repo, revision or None)."""
    body = ref.removeprefix("hf:")
    revision = None
    if "@" in body.rsplit("/", 1)[-1]:
        body, revision = body.rsplit("@", 1)
    parts = body.split("/", 2)
    if len(parts) < 3 or not all(parts) or not revision and revision is not None:
        raise AdapterzooError(f"not a Hub reference: {ref} (hf:OWNER/REPO/PATH[@REVISION])")
    return f"{parts[0]}/{parts[1]}", parts[2], revision


def base_of_tags(tags: list[str] | None) -> str:
    """Our base from the `base_model:...` tags a repo carries, else unknown."""
    for tag in tags or []:
        if tag.startswith("base_model:"):
            name = tag.rsplit(":", 1)[-1].lower()
            for hint, base in BASE_HINTS:
                if hint in name:
                    return base
    return "unknown"


def stated_base(tags: list[str] | None) -> str | None:
    return next((t.rsplit(":", 1)[-1] for t in tags or [] if t.startswith("base_model:")), None)


def kind_of_tags(tags: list[str] | None, path: str | None) -> str:
    tags = tags or []
    if "lora" in tags or path in PRIMARY_NAMES[:2]:
        return "lora"
    if "textual_inversion" in tags or path == PRIMARY_NAMES[2]:
        return "embedding"
    return "checkpoint" if path else "unknown"


def primary_file(info: Any) -> Any | None:
    """The repo file a pull would take by default (see PRIMARY_NAMES), or None."""
    siblings = info.siblings or []
    by_name = {s.rfilename: s for s in siblings}
    for name in PRIMARY_NAMES:
        if name in by_name:
            return by_name[name]
    weights = [s for s in siblings if s.rfilename.endswith(WEIGHT_SUFFIXES)]
    return max(weights, key=lambda s: s.size or 0, default=None)


def page_url(repo: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo}"


def _api() -> Any:
    """huggingface_hub's client, its own retry chatter silenced: a failure reaches the user as our one line."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    _check_online()
    return HfApi()


def _check_online() -> None:
    """huggingface_hub retries a name-resolution failure or a refused connection for half a minute; we say
    'no network' at once instead (its own offline mode, HF_HUB_OFFLINE, answers from the cache)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        _reachable(constants.ENDPOINT)


@functools.cache
def _reachable(endpoint: str) -> None:
    """Once per endpoint and process: a search asks the Hub once per repo it lists."""
    check_reachable(endpoint, endpoint.split("://", 1)[-1])


def _hub_errors(what: str, exc: Exception) -> AdapterzooError:
    """One line for whatever huggingface_hub raised."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, AdapterzooError):
        return exc
    if isinstance(exc, GatedRepoError):
        return AdapterzooError(f"{what} is gated: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return AdapterzooError(f"the Hub has no repo {what} (or it is private: set HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return AdapterzooError(f"the Hub has no such revision of {what}")
    if isinstance(exc, EntryNotFoundError):
        return AdapterzooError(f"the Hub has no file {what}")
    if isinstance(exc, OSError) or any(c.__name__ == "TransportError" for c in type(exc).__mro__):  # httpx's
        host = constants.ENDPOINT.split("://", 1)[-1]
        return AdapterzooError(f"no network: could not reach {host} ({exc.__class__.__name__})")
    return AdapterzooError(f"the Hub answered {what} with an error: {str(exc).strip().splitlines()[0]}")


def model_info(repo: str, revision: str | None = None) -> Any:
    """huggingface_hub's ModelInfo with per-file size and LFS sha256 (files_metadata=True)."""
    try:
        return _api().model_info(repo, revision=revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - every huggingface_hub/httpx failure becomes one line
        raise _hub_errors(repo, exc) from None


def resolve(ref: str) -> RemoteFile:
    """`hf:OWNER/REPO/PATH[@REV]` -> the file at the revision's commit, with its size and LFS sha256."""
    from huggingface_hub import hf_hub_url

    repo, path, revision = parse_ref(ref)
    info = model_info(repo, revision)
    sibling = next((s for s in info.siblings or [] if s.rfilename == path), None)
    if sibling is None:
        raise AdapterzooError(f"the Hub has no file {path} in {repo}" + (f"@{revision}" if revision else ""))
    return RemoteFile(
        ref=f"hf:{repo}/{path}@{info.sha}", download_url=hf_hub_url(repo, path, revision=info.sha),
        file_name=path.rsplit("/", 1)[-1], size=sibling.size, sha256=sibling.lfs.sha256 if sibling.lfs else None,
        source=record(info, path),
    )


def record(info: Any, path: str) -> SourceRecord:
    from huggingface_hub import hf_hub_url

    return SourceRecord(
        provider="hf", download_url=hf_hub_url(info.id, path, revision=info.sha), hf_repo=info.id,
        hf_revision=info.sha, hf_path=path, model_name=info.id, version_name=info.sha,
        kind=kind_of_tags(info.tags, path), base=base_of_tags(info.tags), base_stated=stated_base(info.tags),
        file_name=path.rsplit("/", 1)[-1], nsfw="not-for-all-audiences" in (info.tags or []),
        creator=info.id.split("/", 1)[0] if "/" in info.id else None,
    )


def search(query: str, kind: str | None = None, sort: str = "downloads", limit: int | None = None) -> Iterator[Any]:
    """Up to `limit` repos matching `query` (kind as a tag filter), each a full ModelInfo with file metadata."""
    filters = [KIND_TAGS[kind]] if kind in KIND_TAGS else None
    try:
        for found in _api().list_models(search=query, filter=filters, sort=SORTS[sort], limit=limit):
            yield model_info(found.id)
    except AdapterzooError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _hub_errors("search", exc) from None


def fetch(record: SourceRecord, progress_bar: bool = False) -> Path:
    """The file `record` names, from huggingface_hub's cache (downloaded there first if need be: resumable,
    HF_TOKEN, HF_ENDPOINT). huggingface_hub checks only its size; the caller checks the SHA-256."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not progress_bar:
        disable_progress_bars()
    try:
        return Path(hf_hub_download(record.hf_repo, record.hf_path, revision=record.hf_revision))
    except Exception as exc:  # noqa: BLE001 - every huggingface_hub/httpx failure becomes one line
        raise _hub_errors(f"{record.hf_repo}/{record.hf_path}", exc) from None
    finally:
        if not was_disabled:
            enable_progress_bars()


def drop_cached(path: Path) -> None:
    """Remove a cached file that failed its check (the snapshot link and its blob), so the next pull fetches
    it again instead of finding the same bad bytes."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
