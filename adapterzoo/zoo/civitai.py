"""The Civitai REST API (SOURCES.md section 1): search, model versions, lookup by hash, REF resolution.

One request at a time per client, 429/5xx retried honouring Retry-After; every failure a user can
meet (no network, token needed, no such version) is one AdapterzooError line. The token goes to
the Civitai host only.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.model.registry import families
from adapterzoo.zoo.remote import RemoteFile, SourceRecord

DEFAULT_BASE_URL = "https://civitai.com"
PUBLIC_HOSTS = ("civitai.com", "www.civitai.com", "civitai.green", "civitai.red")
HASH_BATCH = 100  # POST /model-versions/by-hash takes at most this many
PAGE_LIMIT = 100
TIMEOUT_S = 30
MAX_TRIES = 5
MAX_WAIT_S = 60.0  # the longest Retry-After we honour; past it we give up with a message
DESCRIPTION_CHARS = 600

KIND_TYPES = {
    "checkpoint": ["Checkpoint"], "lora": ["LORA"], "lycoris": ["LoCon", "DoRA"], "embedding": ["TextualInversion"],
    "hypernetwork": ["Hypernetwork"], "vae": ["VAE"], "controlnet": ["Controlnet"],
}
TYPE_KINDS = {t: kind for kind, types in KIND_TYPES.items() for t in types}
# Civitai's baseModel labels of each base, as the model families declare them.
BASE_MODELS = {base: list(names) for family in families() for base, names in family.civitai_base_models.items()}
BASE_OF_MODEL = {name: base for base, names in BASE_MODELS.items() for name in names}
SORTS = {"downloads": "Most Downloaded", "rating": "Highest Rated", "newest": "Newest"}
MODEL_PAGE = re.compile(r"^/models/(\d+)(?:/[^/]*)?/?$")
DOWNLOAD_PAGE = re.compile(r"^/api/download/models/(\d+)/?$")


class NotFound(AdapterzooError):
    """Civitai answered 404: no such model, version or hash."""


def kind_of(civitai_type: str | None) -> str:
    return TYPE_KINDS.get(civitai_type or "", "unknown")


def base_of(base_model: str | None) -> str:
    return BASE_OF_MODEL.get(base_model or "", "unknown")


def base_url() -> str:
    return (os.environ.get("CIVITAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def is_civitai_url(url: str) -> bool:
    """True for a civitai.com page or a page of the CIVITAI_BASE_URL host."""
    host = (urlsplit(url).netloc or "").lower()
    return host in PUBLIC_HOSTS or host == urlsplit(base_url()).netloc.lower()


def parse_model_url(url: str) -> tuple[int | None, int | None]:
    """(model id, version id) of a model page `.../models/123/slug?modelVersionId=456` or a download URL."""
    parts = urlsplit(url)
    download = DOWNLOAD_PAGE.match(parts.path)
    if download:
        return None, int(download.group(1))
    page = MODEL_PAGE.match(parts.path)
    if not page:
        raise AdapterzooError(f"not a Civitai model page: {url} (expected https://civitai.com/models/ID)")
    version = parse_qs(parts.query).get("modelVersionId", [""])[0]
    return int(page.group(1)), int(version) if version.isdigit() else None


class CivitaiClient:
    """Requests to one Civitai API host, one at a time, with the token sent only there."""

    def __init__(self, token: str | None = None, url: str | None = None, session: requests.Session | None = None):
        self.url = (url or base_url()).rstrip("/")
        self.host = urlsplit(self.url).netloc
        self.token = token or os.environ.get("CIVITAI_API_TOKEN") or None
        self.session = session or requests.Session()
        self._one_at_a_time = threading.Lock()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer to `method path`, retrying 429/5xx; other failures as one line."""
        url = path if path.startswith("http") else f"{self.url}/api/v1{path}"
        headers = {"Accept": "application/json"}
        if self.token and urlsplit(url).netloc == self.host:
            headers["Authorization"] = f"Bearer {self.token}"
        with self._one_at_a_time:
            for attempt in range(MAX_TRIES):
                try:
                    response = self.session.request(method, url, headers=headers, timeout=TIMEOUT_S, **kwargs)
                except requests.RequestException as exc:
                    raise AdapterzooError(f"no network: could not reach {self.host} ({_reason(exc)})") from None
                if response.status_code != 429 and response.status_code < 500:
                    break
                wait = _retry_after(response, attempt)
                if attempt == MAX_TRIES - 1 or wait > MAX_WAIT_S:
                    raise AdapterzooError(f"{self.host} is busy: {response.status_code} after {attempt + 1} tries")
                time.sleep(wait)
        return self._json(response, url)

    def _json(self, response: requests.Response, url: str) -> Any:
        status = response.status_code
        if status == 401:
            raise AdapterzooError(f"Civitai wants a token for {_shown(url)}: set CIVITAI_API_TOKEN or pass --token"
                                  if not self.token else f"Civitai refused the token for {_shown(url)} (401)")
        if status == 403:
            raise AdapterzooError(f"Civitai refused access to {_shown(url)} (403): the token lacks the right, "
                                  "or the creator restricts it")
        if status == 404:
            raise NotFound(f"Civitai has no {_shown(url)} (404)")
        if status >= 400:
            raise AdapterzooError(f"Civitai answered {status} to {_shown(url)}: {response.text[:120].strip()}")
        try:
            return response.json()
        except ValueError:
            raise AdapterzooError(f"Civitai answered {_shown(url)} with a web page, not JSON") from None

    def version(self, version_id: int) -> dict[str, Any]:
        return self.request("GET", f"/model-versions/{version_id}")

    def model(self, model_id: int) -> dict[str, Any]:
        return self.request("GET", f"/models/{model_id}")

    def version_by_hash(self, digest: str) -> dict[str, Any] | None:
        """The version holding a file with this hash (any type Civitai keeps), or None."""
        try:
            return self.request("GET", f"/model-versions/by-hash/{digest}")
        except NotFound:
            return None

    def versions_by_sha256(self, digests: list[str]) -> list[dict[str, Any]]:
        """Every version that holds one of these files: POSTs of up to 100, or one GET for one hash."""
        if len(digests) == 1:
            found = self.version_by_hash(digests[0])
            return [found] if found else []
        versions: list[dict[str, Any]] = []
        for start in range(0, len(digests), HASH_BATCH):
            versions.extend(self.request("POST", "/model-versions/by-hash", json=digests[start:start + HASH_BATCH]))
        return versions

    def search_models(self, query: str, kind: str | None = None, base: str | None = None, sort: str = "downloads",
                      nsfw: bool = False, page_size: int = 20) -> Iterator[dict[str, Any]]:
        """Models matching `query`, page after page (cursor paging), until the caller stops."""
        params: dict[str, Any] = {"query": query, "limit": min(page_size, PAGE_LIMIT), "sort": SORTS[sort],
                                  "nsfw": "true" if nsfw else "false"}
        if kind:
            params["types"] = KIND_TYPES.get(kind, ["Other"])
        if base:
            params["baseModels"] = BASE_MODELS.get(base, [])
        yield from self._model_pages(params)

    def models_by_id(self, model_ids: Iterable[int]) -> Iterator[dict[str, Any]]:
        """The models with these ids, each with all its versions: one `GET /models?ids=...` per 100 ids.
        NSFW models are asked for too, since Civitai leaves them out by default."""
        ids = sorted(set(model_ids))
        for start in range(0, len(ids), PAGE_LIMIT):
            chunk = ids[start:start + PAGE_LIMIT]
            yield from self._model_pages({"ids": ",".join(map(str, chunk)), "limit": PAGE_LIMIT, "nsfw": "true"})

    def _model_pages(self, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The items of `GET /models` page after page (cursor paging), until the caller stops."""
        params = dict(params)
        while True:
            answer = self.request("GET", "/models", params=params)
            yield from answer.get("items", [])
            cursor = (answer.get("metadata") or {}).get("nextCursor")
            if not cursor or not answer.get("items"):
                return
            params["cursor"] = cursor

    def resolve(self, ref: str) -> RemoteFile:
        """`civitai:VERSION_ID`, `civitai:model/MODEL_ID` or a model page URL -> the primary file to download."""
        if ref.startswith("civitai:"):
            body = ref.removeprefix("civitai:")
            if body.isdigit():
                return self.version_ref(int(body))
            if body.startswith("model/") and body[6:].isdigit():
                return self.newest_file(int(body[6:]))
            raise AdapterzooError(f"not a Civitai reference: {ref} (civitai:VERSION_ID or civitai:model/MODEL_ID)")
        model_id, version_id = parse_model_url(ref)
        if version_id is not None:
            return self.version_ref(version_id)
        return self.newest_file(model_id)  # type: ignore[arg-type]

    def version_ref(self, version_id: int) -> RemoteFile:
        try:
            version = self.version(version_id)
        except NotFound:
            raise NotFound(f"Civitai has no model version {version_id}") from None
        return self.version_file(version, self.model(version["modelId"]))

    def newest_file(self, model_id: int) -> RemoteFile:
        try:
            model = self.model(model_id)
        except NotFound:
            raise NotFound(f"Civitai has no model {model_id}") from None
        versions = model.get("modelVersions") or []
        if not versions:
            raise AdapterzooError(f"Civitai model {model_id} has no versions")
        return self.version_file(self.version(versions[0]["id"]), model)

    def version_file(self, version: dict[str, Any], model: dict[str, Any] | None = None) -> RemoteFile:
        """The primary file of a model-version body (Civitai's own JSON becomes `info`)."""
        primary = primary_file(version)
        if primary is None:
            raise AdapterzooError(f"Civitai version {version.get('id')} has no files")
        record = source_record(version, primary, model)
        return RemoteFile(ref=f"civitai:{version['id']}", download_url=record.download_url or "",
                          file_name=primary.get("name"), size=file_size(primary), sha256=file_sha256(primary),
                          source=record, info=version)

    def fetch_image(self, url: str) -> bytes:
        """A preview image's bytes (images live on another host: no token goes with them)."""
        try:
            response = self.session.get(url, timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            raise AdapterzooError(f"no network: could not reach {urlsplit(url).netloc} ({_reason(exc)})") from None
        if response.status_code != 200:
            raise AdapterzooError(f"preview image {_shown(url)} answered {response.status_code}")
        return response.content


class _Text(HTMLParser):
    """The text of an HTML fragment: tags dropped, script and style bodies left out, entities decoded."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.skipping += tag in ("script", "style")
        if tag in ("p", "br", "li", "div", "h1", "h2", "h3"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        self.skipping -= tag in ("script", "style") and self.skipping > 0

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def description_text(html: str | None, limit: int = DESCRIPTION_CHARS) -> str | None:
    """A Civitai description (creator-written HTML) as plain text, cut at `limit` characters: what we show
    of it, so none of its markup ever reaches a page."""
    if not html:
        return None
    parser = _Text()
    parser.feed(html)
    parser.close()
    text = " ".join("".join(parser.parts).split())
    return (text[: limit - 1] + "…" if len(text) > limit else text) or None


def file_sha256(file: dict[str, Any]) -> str | None:
    digest = (file.get("hashes") or {}).get("SHA256")
    return digest.lower() if digest else None


def file_size(file: dict[str, Any]) -> int | None:
    size_kb = file.get("sizeKB")
    return round(size_kb * 1024) if size_kb is not None else None


def primary_file(version: dict[str, Any]) -> dict[str, Any] | None:
    """The file a pull of the version takes: the one marked primary, else the first."""
    files = version.get("files") or []
    return next((f for f in files if f.get("primary")), files[0] if files else None)


def published(version: dict[str, Any]) -> str | None:
    """When the version came out, as Civitai writes it (ISO 8601); listings may carry only one of the two."""
    return version.get("publishedAt") or version.get("createdAt")


def in_early_access(version: dict[str, Any], now: datetime) -> bool:
    """Whether only paying supporters can download the version now: its `earlyAccessEndsAt` is still ahead, or,
    without that date, Civitai marks its availability EarlyAccess."""
    ends = version.get("earlyAccessEndsAt")
    try:
        until = datetime.fromisoformat(ends) if ends else None
    except ValueError:
        until = None
    if until is not None:
        return (until if until.tzinfo else until.replace(tzinfo=timezone.utc)) > now
    return version.get("availability") == "EarlyAccess"


def preview_url(version: dict[str, Any]) -> str | None:
    """The first still image of a version (videos can't be a .preview.png)."""
    return next((i["url"] for i in version.get("images") or [] if i.get("type", "image") == "image" and i.get("url")),
                None)


def source_record(version: dict[str, Any], file: dict[str, Any], model: dict[str, Any] | None = None) -> SourceRecord:
    """Our record of `file` in `version`; licence flags come from the model body when we have it."""
    about = version.get("model") or {}
    model = model or {}
    commercial = model.get("allowCommercialUse")
    return SourceRecord(
        provider="civitai", download_url=file.get("downloadUrl") or version.get("downloadUrl"),
        civitai_model_id=version.get("modelId") or model.get("id"), civitai_version_id=version.get("id"),
        model_name=about.get("name") or model.get("name"), version_name=version.get("name"),
        kind=kind_of(about.get("type") or model.get("type")), base=base_of(version.get("baseModel")),
        base_stated=version.get("baseModel"), trained_words=list(version.get("trainedWords") or []),
        allow_commercial_use=[commercial] if isinstance(commercial, str) else commercial,
        allow_derivatives=model.get("allowDerivatives"), allow_no_credit=model.get("allowNoCredit"),
        nsfw=about.get("nsfw", model.get("nsfw")), file_name=file.get("name"), preview_url=preview_url(version),
        creator=(model.get("creator") or {}).get("username"),
    )


def _retry_after(response: requests.Response, attempt: int) -> float:
    """Seconds to wait: the server's Retry-After when it gives one in seconds, else 1, 2, 4, ..."""
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return float(2 ** attempt)


def _reason(exc: requests.RequestException) -> str:
    text = str(exc.__context__ or exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Temporary failure",
                   "No route to host", "Network is unreachable"):
        if marker in text:
            return marker.lower()
    return exc.__class__.__name__


def _shown(url: str) -> str:
    """The URL without its query (a ?token= must never reach a message)."""
    parts = urlsplit(url)
    return f"{parts.path}" if parts.path.startswith("/api/v1") else f"{parts.netloc}{parts.path}"
