"""`search`: one hit per model version on Civitai and per repo (at its commit) on the Hub, marked when
a file of it (same SHA-256) is already in the registry."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from sqlalchemy import Engine

from adapterzoo.zoo.queries import paths_by_sha256

SOURCES = ("civitai", "hf", "all")
ID_BATCH = 500
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # a Hub repo's first image stands for its preview
HUB_OVERFETCH = 5  # repos listed per Hub row wanted: base and kind are filtered here, after listing


@dataclass
class Hit:
    """One row: `json` is the object `search --json` prints; downloads is for the table."""

    json: dict[str, Any]
    downloads: int

    def row(self) -> dict[str, Any]:
        primary = self.json["files"][0] if self.json["files"] else {}
        return {**self.json, "file": primary.get("name"), "size": primary.get("size"), "downloads": self.downloads}


def search(engine: Engine, query: str, source: str = "all", kind: str | None = None, base: str | None = None,
           sort: str = "downloads", limit: int = 20, nsfw: bool = False) -> list[Hit]:
    """Up to `limit` hits; with source all, Civitai fills half and the Hub the rest."""
    hits: list[Hit] = []
    if source in ("civitai", "all"):
        share = limit if source == "civitai" else (limit + 1) // 2
        hits += islice(_civitai_hits(query, kind, base, sort, nsfw, share), share)
    if source in ("hf", "all"):
        wanted = limit - len(hits)
        hits += islice(_hub_hits(query, kind, base, sort, nsfw, wanted * HUB_OVERFETCH), wanted)
    known = paths_by_sha256(engine, [f["sha256"] for h in hits for f in h.json["files"] if f["sha256"]])
    for hit in hits:
        hit.json["in_registry"] = any(f["sha256"] in known for f in hit.json["files"])
    return hits


def _civitai_hits(query: str, kind: str | None, base: str | None, sort: str, nsfw: bool,
                  page_size: int) -> Iterator[Hit]:
    from adapterzoo.zoo import civitai

    client = civitai.CivitaiClient()
    for model in client.search_models(query, kind, base, sort, nsfw, page_size=page_size):
        for version in model.get("modelVersions") or []:
            if base and civitai.base_of(version.get("baseModel")) != base:
                continue  # the model matched on another version's base
            files = sorted(version.get("files") or [], key=lambda f: not f.get("primary"))
            yield Hit({
                "source": "civitai", "model_id": model["id"], "version_id": version["id"], "name": model.get("name"),
                "version_name": version.get("name"), "kind": civitai.kind_of(model.get("type")),
                "base": civitai.base_of(version.get("baseModel")),
                "url": f"{client.url}/models/{model['id']}?modelVersionId={version['id']}",
                "trained_words": list(version.get("trainedWords") or []),
                "description": civitai.description_text(model.get("description")),
                "image": civitai.preview_url(version),
                "files": [{"name": f.get("name"), "size": civitai.file_size(f), "sha256": civitai.file_sha256(f),
                           "download": f.get("downloadUrl")} for f in files],
                "in_registry": False,
            }, _downloads(version) or _downloads(model))


def _downloads(body: dict[str, Any]) -> int:
    return (body.get("stats") or {}).get("downloadCount") or 0


def _hub_hits(query: str, kind: str | None, base: str | None, sort: str, nsfw: bool, repos: int) -> Iterator[Hit]:
    from huggingface_hub import hf_hub_url

    from adapterzoo.zoo import hub

    for info in hub.search(query, kind, sort, repos):
        primary = hub.primary_file(info)
        record = hub.record(info, primary.rfilename if primary else "")
        if (kind and record.kind != kind) or (base and record.base != base) or (record.nsfw and not nsfw):
            continue
        weights = [s for s in info.siblings or [] if s.rfilename.endswith(hub.WEIGHT_SUFFIXES)]
        weights.sort(key=lambda s: s is not primary)
        image = next((s.rfilename for s in info.siblings or [] if s.rfilename.lower().endswith(IMAGE_SUFFIXES)), None)
        yield Hit({
            "source": "hf", "model_id": info.id, "version_id": info.sha, "name": info.id, "version_name": info.sha,
            "kind": record.kind, "base": record.base, "url": hub.page_url(info.id), "trained_words": [],
            "description": None, "image": hf_hub_url(info.id, image, revision=info.sha) if image else None,
            "files": [{"name": s.rfilename, "size": s.size, "sha256": s.lfs.sha256 if s.lfs else None,
                       "download": hf_hub_url(info.id, s.rfilename, revision=info.sha)} for s in weights],
            "in_registry": False,
        }, info.downloads or 0)
