"""A fake Hugging Face Hub on 127.0.0.1 serving what huggingface_hub 2.4 calls (SOURCES.md section 2).

`HfApi.list_models` (GET /api/models, Link-header paging), `HfApi.model_info(files_metadata=True)`
(GET /api/models/{repo}[/revision/{rev}]?blobs=true) and `hf_hub_download` (HEAD/GET
/{repo}/resolve/{rev}/{path} with X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size; LFS files
answer 302 to a second "storage" server, which refuses an Authorization header as signed URLs do).
huggingface_hub reads HF_ENDPOINT when it is imported, so the fixture also points its constants here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from fake_http import Handler, running

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".png")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    id: str
    files: dict[str, bytes]
    tags: list[str]
    downloads: int
    commit: str
    likes: int = 0
    created: str = "2024-01-01T00:00:00.000Z"

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    url: str = ""
    storage_url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)  # LFS sha256 -> bytes, served by storage

    def add_repo(self, repo_id: str, files: dict[str, Path | bytes], tags: list[str] | None = None,
                 downloads: int = 5) -> FakeRepo:
        contents = {name: f if isinstance(f, bytes) else f.read_bytes() for name, f in files.items()}
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(contents.values()))).hexdigest()
        repo = FakeRepo(repo_id, contents, tags or [], downloads, commit,
                        created=f"2024-02-{len(self.repos) + 1:02d}T00:00:00.000Z")
        self.repos[repo_id] = repo
        for name, data in contents.items():
            if repo.is_lfs(name):
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        return repo

    def sibling(self, repo: FakeRepo, name: str, blobs: bool) -> dict[str, Any]:
        data = repo.files[name]
        entry: dict[str, Any] = {"rfilename": name}
        if blobs:
            entry.update(size=len(data), blobId=git_blob_sha1(data))
            if repo.is_lfs(name):
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def info(self, repo: FakeRepo, full: bool, blobs: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "_id": repo.commit[:24], "id": repo.id, "modelId": repo.id, "likes": repo.likes,
            "downloads": repo.downloads, "tags": repo.tags, "private": False, "createdAt": repo.created,
            "library_name": "diffusers" if "lora" in repo.tags else None,
        }
        if full:
            body.update(author=repo.id.split("/")[0], sha=repo.commit, lastModified=repo.created, gated=False,
                        disabled=False, siblings=[self.sibling(repo, n, blobs) for n in sorted(repo.files)])
        return body


class _Handler(Handler):
    def _missing(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.answer(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def serve(self) -> None:
        hub: FakeHub = self.server.state
        parts = urlsplit(self.path)
        hub.requests.append({"server": self.server.role, "method": self.command, "path": unquote(parts.path),
                             "authorization": self.headers.get("Authorization")})
        if self.server.role == "storage":
            self._storage(hub, parts.path)
        elif parts.path == "/api/models":
            self._list(hub, parse_qs(parts.query))
        elif parts.path.startswith("/api/models/"):
            self._model_info(hub, unquote(parts.path.removeprefix("/api/models/")), parse_qs(parts.query))
        elif "/resolve/" in parts.path:
            self._resolve(hub, unquote(parts.path))
        else:
            self.answer(404, {"error": "Not found"})

    def _list(self, hub: FakeHub, query: dict[str, list[str]]) -> None:
        search = query.get("search", [""])[0].lower()
        tags = query.get("filter", [])
        repos = [r for r in hub.repos.values() if search in r.id.lower() and all(t in r.tags for t in tags)]
        sort = query.get("sort", [""])[0]
        if sort in ("downloads", "likes"):
            repos.sort(key=lambda r: -getattr(r, sort))
        elif sort == "createdAt":
            repos.sort(key=lambda r: r.created, reverse=True)
        limit = int(query.get("limit", ["1000"])[0])
        start = int(query.get("cursor", ["0"])[0])
        headers = {}
        if start + limit < len(repos):
            rest = "&".join(f"{k}={v}" for k, values in query.items() if k != "cursor" for v in values)
            headers["Link"] = f'<{hub.url}/api/models?{rest}&cursor={start + limit}>; rel="next"'
        full = query.get("full", [""])[0].lower() == "true"
        self.answer(200, [hub.info(r, full) for r in repos[start:start + limit]], headers)

    def _model_info(self, hub: FakeHub, rest: str, query: dict[str, list[str]]) -> None:
        repo_id, _, revision = rest.partition("/revision/")
        repo = hub.repos.get(repo_id)
        if repo is None:
            self._missing("RepoNotFound", "Repository not found")
        elif revision and revision not in ("main", repo.commit):
            self._missing("RevisionNotFound", f"Invalid rev id: {revision}")
        else:
            self.answer(200, hub.info(repo, full=True, blobs=query.get("blobs", [""])[0].lower() == "true"))

    def _resolve(self, hub: FakeHub, path: str) -> None:
        head, _, tail = path.lstrip("/").partition("/resolve/")
        revision, _, name = tail.partition("/")
        repo = hub.repos.get(head)
        if repo is None:
            self._missing("RepoNotFound", "Repository not found")
            return
        if revision not in ("main", repo.commit):
            self._missing("RevisionNotFound", f"Invalid rev id: {revision}")
            return
        commit = {"X-Repo-Commit": repo.commit}
        if name not in repo.files:
            self._missing("EntryNotFound", "Entry not found", commit)
            return
        data = repo.files[name]
        if repo.is_lfs(name):
            sha256 = hashlib.sha256(data).hexdigest()
            self.answer(302, raw=b"", headers={
                **commit, "ETag": f'"{git_blob_sha1(data)}"', "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)), "Location": f"{hub.storage_url}/lfs/{sha256}?X-Signature=fake",
            })
        else:
            self.answer(200, raw=data, headers={**commit, "ETag": f'"{git_blob_sha1(data)}"'})

    def _storage(self, hub: FakeHub, path: str) -> None:
        if self.headers.get("Authorization"):
            self.answer(400, {"error": "Only one auth mechanism allowed"})
            return
        data = hub.blobs.get(path.removeprefix("/lfs/"))
        if data is None:
            self.answer(404, {"error": "NoSuchKey"})
            return
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged[6:].split("-")[0].isdigit():
            start = int(ranged[6:].split("-")[0])
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            self.answer(206, raw=data[start:], headers=headers)
        else:
            self.answer(200, raw=data)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running fake Hub and its storage; HF_ENDPOINT and huggingface_hub's constants point at it."""
    from huggingface_hub import constants

    hub = FakeHub()
    with running(_Handler, hub, "hub") as hub.url, running(_Handler, hub, "storage") as hub.storage_url:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield hub
