"""A fake Civitai API on 127.0.0.1 that answers in the shapes of the real one (SOURCES.md section 1).

Models are built from real files the test wrote, so every hash it serves is the file's true hash.
The code under test only sees CIVITAI_BASE_URL; the `fake_civitai` fixture sets it. Downloads answer
307 to the signed-URL storage host of tests/fake_storage.py, which refuses any request carrying an
Authorization header, as Civitai's storage does; `served()` reaches a file's storage switches (cuts,
ignored Range, throttling, wrong bytes).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from fake_http import Handler, running
from fake_storage import LOGIN_PAGE, FakeStorage, Served

TOKEN = "secret-civitai-token"
AIR_TYPES = {"LORA": "lora", "LoCon": "lycoris", "Checkpoint": "checkpoint", "TextualInversion": "embedding",
             "Hypernetwork": "hypernetwork", "VAE": "vae"}
ECOSYSTEMS = {"SD 1.5": "sd1", "SD 2.1": "sd2", "SDXL 1.0": "sdxl", "Pony": "sdxl", "Flux.1 D": "flux"}


def tiny_png(rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A valid 1x1 PNG, so a preview image is a real image file."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\x00" + bytes(rgb)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def file_hashes(data: bytes) -> dict[str, str]:
    """The hashes Civitai lists for a file, upper-case hex, computed here from the bytes (not by adapterzoo)."""
    sha256 = hashlib.sha256(data).hexdigest().upper()
    return {
        "AutoV1": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8].upper(),
        "AutoV2": sha256[:10],
        "SHA256": sha256,
        "CRC32": f"{zlib.crc32(data):08X}",
    }


@dataclass
class FakeVersion:
    id: int
    model_id: int
    name: str
    base_model: str
    files: list[tuple[str, bytes]]  # (name, bytes); the first is the primary file
    trained_words: list[str]
    needs_token: bool = False
    download_needs_token: bool = False  # early access: the version is public, its download answers a login page
    created: str = "2024-01-01T00:00:00.000Z"
    early_access_ends: str | None = None  # ISO time: the version is in early access until then


@dataclass
class FakeModel:
    id: int
    name: str
    type: str
    nsfw: bool
    downloads: int
    versions: list[FakeVersion] = field(default_factory=list)  # newest first, as Civitai lists them
    allow_commercial_use: list[str] = field(default_factory=lambda: ["Image", "Rent"])
    allow_derivatives: bool = True
    allow_no_credit: bool = True
    description: str = "<p>a test model</p>"  # creator-written HTML, as Civitai serves it


class FakeCivitai:
    """The server's data and switches; `url` is what CIVITAI_BASE_URL would be."""

    def __init__(self, storage: FakeStorage) -> None:
        self.storage = storage
        self.models: dict[int, FakeModel] = {}
        self.versions: dict[int, FakeVersion] = {}
        self.requests: list[dict[str, Any]] = []  # method, path, query, authorization of every request
        self.throttle_left = 0
        self.retry_after = "0"
        self.url = ""
        self._next_id = 100
        self._lock = threading.Lock()
        self.active = 0
        self.most_active = 0  # most requests in flight at once: a polite client keeps this at 1

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add_model(self, name: str, files: list[Path], type: str = "LORA", base_model: str = "SD 1.5",
                  trained_words: list[str] | None = None, nsfw: bool = False, downloads: int = 10,
                  needs_token: bool = False, version_name: str = "v1.0",
                  download_needs_token: bool = False) -> FakeModel:
        """A model with one version holding `files` (the first is primary)."""
        model = FakeModel(self._id(), name, type, nsfw, downloads)
        self.models[model.id] = model
        self.add_version(model, files, base_model, trained_words or [], needs_token, version_name,
                         download_needs_token)
        return model

    def add_version(self, model: FakeModel, files: list[Path], base_model: str, trained_words: list[str],
                    needs_token: bool = False, name: str = "v2.0", download_needs_token: bool = False,
                    early_access_ends: str | None = None) -> FakeVersion:
        """A newer version of `model`: it goes first in modelVersions. Its files go to the storage host."""
        version = FakeVersion(self._id(), model.id, name, base_model, [(p.name, p.read_bytes()) for p in files],
                              trained_words, needs_token, download_needs_token,
                              created=f"2024-01-{len(model.versions) + 1:02d}T00:00:00.000Z",
                              early_access_ends=early_access_ends)
        model.versions.insert(0, version)
        self.versions[version.id] = version
        for index, (file_name, data) in enumerate(version.files):
            disposition = f"attachment; filename=\"{file_name}\"; filename*=UTF-8''{quote(file_name)}"
            self.storage.files[f"{version.id}-{index}"] = Served(data, content_disposition=disposition)
        return version

    def served(self, version_id: int, index: int = 0) -> Served:
        """What the storage host answers for a version's file; tests flip its switches."""
        return self.storage.files[f"{version_id}-{index}"]

    def throttle(self, times: int, retry_after: str = "0") -> None:
        """The next `times` requests answer 429 with this Retry-After."""
        self.throttle_left, self.retry_after = times, retry_after

    # -- JSON in Civitai's shapes --------------------------------------------------------------

    def file_json(self, version: FakeVersion, index: int) -> dict[str, Any]:
        name, data = version.files[index]
        return {
            "id": version.id * 10 + index, "name": name, "type": "Model", "sizeKB": len(data) / 1024,
            "metadata": {"format": "SafeTensor" if name.endswith(".safetensors") else "PickleTensor",
                         "size": "pruned", "fp": "fp16"},
            "pickleScanResult": "Success", "virusScanResult": "Success",
            "hashes": file_hashes(data), "primary": index == 0,
            "downloadUrl": f"{self.url}/api/download/models/{version.id}"
                           + ("" if index == 0 else f"?type=Other&i={index}"),
        }

    def version_json(self, version: FakeVersion, with_model: bool = True) -> dict[str, Any]:
        model = self.models[version.model_id]
        air_type = AIR_TYPES.get(model.type, "other")
        body: dict[str, Any] = {
            "id": version.id, "modelId": model.id, "name": version.name, "createdAt": version.created,
            "publishedAt": version.created, "status": "Published",
            "availability": "EarlyAccess" if version.early_access_ends else "Public",
            "earlyAccessEndsAt": version.early_access_ends,
            "baseModel": version.base_model, "baseModelType": "Standard",
            "air": f"urn:air:{ECOSYSTEMS.get(version.base_model, 'sd1')}:{air_type}:civitai:{model.id}@{version.id}",
            "trainedWords": version.trained_words, "description": None,
            "stats": {"downloadCount": model.downloads, "ratingCount": 0, "rating": 0},
            "files": [self.file_json(version, i) for i in range(len(version.files))],
            "images": [{"url": f"{self.url}/images/{version.id}/width=450/{version.id}.jpeg", "nsfwLevel": 1,
                        "width": 1, "height": 1, "hash": "U00000fQfQfQfQfQfQfQfQfQfQfQ", "type": "image",
                        "meta": {"prompt": " ".join(version.trained_words), "seed": 1}}],
            "downloadUrl": f"{self.url}/api/download/models/{version.id}",
        }
        if with_model:
            body["model"] = {"name": model.name, "type": model.type, "nsfw": model.nsfw, "poi": False}
        return body

    def model_json(self, model: FakeModel) -> dict[str, Any]:
        return {
            "id": model.id, "name": model.name, "description": model.description, "type": model.type,
            "poi": False, "nsfw": model.nsfw, "nsfwLevel": 4 if model.nsfw else 1,
            "allowNoCredit": model.allow_no_credit, "allowCommercialUse": model.allow_commercial_use,
            "allowDerivatives": model.allow_derivatives, "allowDifferentLicense": True,
            "stats": {"downloadCount": model.downloads, "favoriteCount": 0, "commentCount": 0, "rating": 0},
            "creator": {"username": "tester", "image": None}, "tags": ["test"],
            "modelVersions": [self.version_json(v, with_model=False) for v in model.versions],
        }

    def by_hash(self, digest: str) -> FakeVersion | None:
        digest = digest.upper()
        for version in self.versions.values():
            if any(digest in file_hashes(data).values() for _, data in version.files):
                return version
        return None


class _Handler(Handler):
    def _error(self, status: int, message: str) -> None:
        self.answer(status, {"error": message})

    def _authorized(self, query: dict[str, list[str]]) -> bool:
        return (self.headers.get("Authorization") == f"Bearer {TOKEN}") or query.get("token") == [TOKEN]

    def serve(self) -> None:
        fake: FakeCivitai = self.server.state
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else b""
        with fake._lock:
            fake.requests.append({"method": self.command, "path": parts.path, "query": query,
                                  "authorization": self.headers.get("Authorization")})
            fake.active += 1
            fake.most_active = max(fake.most_active, fake.active)
            throttled = fake.throttle_left > 0
            fake.throttle_left -= throttled
        try:
            if throttled:
                self.answer(429, {"error": "Too many requests"}, {"Retry-After": fake.retry_after})
            else:
                self._route(fake, parts.path.rstrip("/").split("/")[1:], query, body)
        finally:
            with fake._lock:
                fake.active -= 1

    def _route(self, fake: FakeCivitai, path: list[str], query: dict[str, list[str]], body: bytes) -> None:
        if path[:2] == ["api", "v1"]:
            self._api(fake, path[2:], query, body)
        elif path[:3] == ["api", "download", "models"] and path[3:] and path[3].isdigit():
            self._download(fake, int(path[3]), query)
        elif path[:1] == ["images"]:
            self.answer(200, raw=tiny_png(), content_type="image/png")
        else:
            self.answer(404, raw=b"<!DOCTYPE html><html><body>Page not found</body></html>", content_type="text/html")

    def _api(self, fake: FakeCivitai, path: list[str], query: dict[str, list[str]], body: bytes) -> None:
        if path == ["models"]:
            try:
                listing = self._search(fake, query)
            except ValueError:  # e.g. ids=1,x: Civitai answers 400 to an invalid value
                self._error(400, "Invalid query parameters")
                return
            self.answer(200, listing)
        elif len(path) == 2 and path[0] == "models":
            model = fake.models.get(int(path[1])) if path[1].isdigit() else None
            if model is None:
                self._error(404, f"No model with id {path[1]}")
            else:
                self.answer(200, fake.model_json(model))
        elif path == ["model-versions", "by-hash"] and self.command == "POST":
            try:
                hashes = json.loads(body)
            except ValueError:
                hashes = None
            if not isinstance(hashes, list) or len(hashes) > 100:
                self._error(400, "Expected an array of at most 100 hashes")
                return
            found = [v for v in (fake.by_hash(h) for h in hashes) if v is not None]
            unique = list({v.id: v for v in found}.values())
            self.answer(200, [fake.version_json(v) for v in unique if self._allowed(v, query)])
        elif len(path) == 3 and path[:2] == ["model-versions", "by-hash"]:
            self._version(fake, fake.by_hash(path[2]), query, f"No model version with hash {path[2]}")
        elif len(path) == 2 and path[0] == "model-versions":
            version = fake.versions.get(int(path[1])) if path[1].isdigit() else None
            self._version(fake, version, query, f"No model version with id {path[1]}")
        else:
            self._error(404, "Not found")

    def _allowed(self, version: FakeVersion, query: dict[str, list[str]]) -> bool:
        return not version.needs_token or self._authorized(query)

    def _version(self, fake: FakeCivitai, version: FakeVersion | None, query: dict[str, list[str]],
                 missing: str) -> None:
        if version is None:
            self._error(404, missing)
        elif not self._allowed(version, query):
            self._error(401, "Unauthorized")
        else:
            self.answer(200, fake.version_json(version))

    def _search(self, fake: FakeCivitai, query: dict[str, list[str]]) -> dict[str, Any]:
        limit = int(query.get("limit", ["100"])[0])
        text = query.get("query", [""])[0].lower()
        types = set(query.get("types", []))
        bases = set(query.get("baseModels", []))
        nsfw = query.get("nsfw", ["false"])[0].lower() == "true"  # Civitai leaves NSFW out unless asked
        ids = {int(i) for value in query.get("ids", []) for i in value.split(",")}  # comma-separated
        models = [m for m in fake.models.values()
                  if text in m.name.lower() and (not types or m.type in types) and (nsfw or not m.nsfw)
                  and (not bases or any(v.base_model in bases for v in m.versions)) and (not ids or m.id in ids)]
        sort = query.get("sort", ["Highest Rated"])[0]
        if sort == "Most Downloaded":
            models.sort(key=lambda m: -m.downloads)
        elif sort == "Newest":
            models.sort(key=lambda m: -m.id)
        start = int(query.get("cursor", ["0"])[0])
        page = models[start:start + limit]
        metadata: dict[str, Any] = {"pageSize": limit}
        if start + limit < len(models):
            metadata["nextCursor"] = str(start + limit)
            metadata["nextPage"] = f"{fake.url}/api/v1/models?cursor={start + limit}&limit={limit}"
        return {"items": [fake.model_json(m) for m in page], "metadata": metadata}

    def _download(self, fake: FakeCivitai, version_id: int, query: dict[str, list[str]]) -> None:
        """307 to a signed storage URL, as Civitai answers; a gated download without a token answers 401,
        or for early access Civitai's sign-in page with status 200."""
        version = fake.versions.get(version_id)
        if version is None:
            self._error(404, f"No model version with id {version_id}")
        elif not self._allowed(version, query):
            self._error(401, "Unauthorized")
        elif version.download_needs_token and not self._authorized(query):
            self.answer(200, raw=LOGIN_PAGE, content_type="text/html; charset=utf-8")
        else:
            key = f"{version_id}-{int(query.get('i', ['0'])[0])}"
            self.answer(307, raw=b"", content_type="text/plain",
                        headers={"Location": f"{fake.storage.url('storage')}/{key}?sig=fake-signature"})


@pytest.fixture
def fake_civitai(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCivitai]:
    """A running fake Civitai and its storage host; CIVITAI_BASE_URL points at it and no token is set."""
    with FakeStorage() as storage:
        fake = FakeCivitai(storage)
        with running(_Handler, fake) as fake.url:
            monkeypatch.setenv("CIVITAI_BASE_URL", fake.url)
            monkeypatch.delenv("CIVITAI_API_TOKEN", raising=False)
            yield fake
