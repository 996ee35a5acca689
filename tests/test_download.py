"""The download engine against fake servers that redirect, cut, ignore Range, lie and throttle."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fake_storage import LOGIN_PAGE, FakeStorage, Served

import factory
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.safetensors_header import read_header
from adapterzoo.zoo import download as engine
from adapterzoo.zoo.download import download
from adapterzoo.zoo.hashing import hash_file
from adapterzoo.zoo.http_get import Host, Retry

CIVITAI = Host("Civitai", "CIVITAI_API_TOKEN")
LORA = (factory.REAL / "analog_svd_rank4.safetensors").read_bytes()
SHA = hashlib.sha256(LORA).hexdigest()
TOKEN = {"Authorization": "Bearer secret"}


@pytest.fixture
def fake() -> Iterator[FakeStorage]:
    with FakeStorage() as server:
        yield server


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def retry(sleeps: list[float]) -> Retry:
    return Retry(attempts=4, backoff_s=0.5, sleep=sleeps.append)


def only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_token_goes_to_the_download_host_only_and_the_file_is_hashed_as_it_streams(
    fake: FakeStorage, tmp_path: Path, retry: Retry
) -> None:
    url = fake.add("101", Served(LORA, token="secret"))
    headers = {**TOKEN, "X-Api-Key": "secret"}  # requests itself would strip Authorization only
    got = download(url, tmp_path, headers=headers, size=len(LORA), sha256=SHA.upper(), host=CIVITAI, retry=retry)

    assert got.path == tmp_path / "model.safetensors" and got.path.read_bytes() == LORA
    assert [s.headers.get("Authorization") for s in fake.seen] == ["Bearer secret", None]
    assert [s.headers.get("X-Api-Key") for s in fake.seen] == ["secret", None]
    assert {s.headers.get("Accept-Encoding") for s in fake.seen} == {"identity"}  # Range counts raw bytes
    assert [s.server for s in fake.seen] == ["api", "storage"]
    assert got.hashes == hash_file(got.path, data_offset=read_header(got.path).data_offset)
    assert got.hashes.autov3 is not None and not got.reused and got.beside is None
    assert only_files(tmp_path) == ["model.safetensors"]


def test_the_storage_host_refuses_a_request_carrying_authorization(fake: FakeStorage) -> None:
    """The fake is strict the way signed URLs are: it would catch a client that forwards the token."""
    fake.add("102", Served(LORA))
    answer = requests.get(f"{fake.url('storage')}/102?sig=x", headers=TOKEN, timeout=5)
    assert answer.status_code == 400 and b"Only one auth mechanism" in answer.content


def test_a_cut_is_resumed_with_range_in_the_same_call(
    fake: FakeStorage, tmp_path: Path, retry: Retry, sleeps: list[float]
) -> None:
    half = len(LORA) // 2
    url = fake.add("103", Served(LORA, cut_at=half))
    got = download(url, tmp_path, sha256=SHA, retry=retry)

    storage = fake.requests_to("storage")
    assert [s.headers.get("Range") is None for s in storage] == [True, False]
    resumed = int(storage[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed <= half  # whole chunks that arrived before the cut are kept
    assert storage[1].headers.get("If-Range") == fake.files["103"].tag()
    assert got.path.read_bytes() == LORA and got.hashes.sha256 == SHA and sleeps == [0.5]
    assert got.hashes == hash_file(got.path, data_offset=read_header(got.path).data_offset)


def test_a_cut_leaves_the_part_and_the_next_call_resumes_it(fake: FakeStorage, tmp_path: Path) -> None:
    half = len(LORA) // 2 + 12345
    url = fake.add("104", Served(LORA, cut_at=half))
    with pytest.raises(AdapterzooError, match=r"^the download from Civitai was cut \(.*\); gave up after 1 tries$"):
        download(url, tmp_path, name="model.safetensors", host=CIVITAI, retry=Retry(attempts=1))
    assert only_files(tmp_path) == ["model.safetensors.part"]
    kept = (tmp_path / "model.safetensors.part").read_bytes()
    assert 0 < len(kept) <= half and kept == LORA[:len(kept)]

    got = download(url, tmp_path, name="model.safetensors", sha256=SHA, retry=Retry(attempts=1))
    assert fake.requests_to("storage")[-1].headers["Range"] == f"bytes={len(kept)}-"
    assert got.resumed_from == len(kept) and got.path.read_bytes() == LORA
    assert got.hashes == hash_file(got.path, data_offset=read_header(got.path).data_offset)
    assert only_files(tmp_path) == ["model.safetensors"]


def test_without_a_name_the_first_answer_names_the_part_and_the_rest_is_asked_for(
    fake: FakeStorage, tmp_path: Path
) -> None:
    (tmp_path / "model.safetensors.part").write_bytes(LORA[:1000])
    got = download(fake.add("105", Served(LORA)), tmp_path, sha256=SHA)
    assert [s.headers.get("Range") for s in fake.requests_to("storage")] == [None, "bytes=1000-"]
    assert got.resumed_from == 1000 and got.path.read_bytes() == LORA


def test_a_server_that_ignores_range_restarts_cleanly(fake: FakeStorage, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.part").write_bytes(b"\xff" * 5000)  # not even the right bytes
    url = fake.add("106", Served(LORA, ignore_range=True))
    got = download(url, tmp_path, name="model.safetensors", sha256=SHA)
    assert fake.requests_to("storage")[0].headers["Range"] == "bytes=5000-"
    assert got.resumed_from == 0 and got.path.read_bytes() == LORA and got.hashes.sha256 == SHA


def test_a_file_changed_on_the_server_between_runs_restarts_from_zero(fake: FakeStorage, tmp_path: Path) -> None:
    old = LORA[:-100] + b"\x01" * 100
    url = fake.add("107", Served(old, cut_at=len(LORA) // 2, etag='"v1"'))
    with pytest.raises(AdapterzooError, match="was cut"):
        download(url, tmp_path, name="model.safetensors", retry=Retry(attempts=1))
    fake.files["107"] = Served(LORA, etag='"v2"')

    got = download(url, tmp_path, name="model.safetensors")
    assert fake.requests_to("storage")[-1].headers["If-Range"] == '"v1"'
    assert got.path.read_bytes() == LORA and got.hashes.sha256 == SHA


def test_wrong_bytes_leave_nothing_and_say_which_side(fake: FakeStorage, tmp_path: Path) -> None:
    wrong = LORA[:-1] + b"\x00"
    url = fake.add("108", Served(wrong))
    claimed = SHA
    with pytest.raises(AdapterzooError) as caught:
        download(url, tmp_path, size=len(LORA), sha256=claimed, host=CIVITAI)
    message = str(caught.value)
    assert f"its SHA256 is {hashlib.sha256(wrong).hexdigest()} but Civitai says {claimed}" in message
    assert message.endswith("nothing was saved") and "\n" not in message
    assert only_files(tmp_path) == []


def test_a_short_file_is_refused_by_size(fake: FakeStorage, tmp_path: Path) -> None:
    url = fake.add("109", Served(LORA[:1000]))
    with pytest.raises(AdapterzooError, match=f"1000 bytes arrived but Civitai says the file is {len(LORA)}"):
        download(url, tmp_path, size=len(LORA), host=CIVITAI)
    assert only_files(tmp_path) == []


def test_429_and_503_are_retried_honouring_retry_after(
    fake: FakeStorage, tmp_path: Path, retry: Retry, sleeps: list[float]
) -> None:
    url = fake.add("110", Served(LORA, throttle=[(429, "3"), (503, None)]))
    got = download(url, tmp_path, sha256=SHA, retry=retry)
    assert got.hashes.sha256 == SHA
    assert sleeps == [3.0, 1.0]  # Retry-After, then the second backoff step


def test_throttling_past_the_limit_is_one_line(
    fake: FakeStorage, tmp_path: Path, retry: Retry, sleeps: list[float]
) -> None:
    url = fake.add("111", Served(LORA, throttle=[(429, None)] * 10))
    with pytest.raises(AdapterzooError, match=r"^Civitai answered 429 Too Many Requests; gave up after 4 tries$"):
        download(url, tmp_path, host=CIVITAI, retry=retry)
    assert sleeps == [0.5, 1.0, 2.0] and only_files(tmp_path) == []


def test_a_retry_after_longer_than_we_wait_fails_at_once(fake: FakeStorage, tmp_path: Path, retry: Retry) -> None:
    url = fake.add("112", Served(LORA, throttle=[(429, "3600")]))
    with pytest.raises(AdapterzooError, match="asks to wait 3600 s; try again later"):
        download(url, tmp_path, host=CIVITAI, retry=retry)


@pytest.mark.parametrize(("header", "expected"), [
    ('attachment; filename="../../x.safetensors"', "x.safetensors"),
    ("attachment; filename=..\\..\\evil\\x.safetensors", "x.safetensors"),
    ('attachment; filename="a\x01b\x7fc.safetensors"', "abc.safetensors"),
    ("attachment; filename*=UTF-8''%C3%A9t%C3%A9%20lora.safetensors; filename=\"ete.safetensors\"",
     "été lora.safetensors"),
    ("attachment; filename=\"fallback.safetensors\"; filename*=UTF-8''%2E%2E%2F%2E%2E%2Fdeep.safetensors",
     "deep.safetensors"),
    ('attachment; filename="CON.safetensors"', "_CON.safetensors"),
    ('attachment; filename="lpt1"', "_lpt1"),
    ('attachment; filename=".bashrc"', "bashrc"),
    ("attachment; filename*=UTF-8''x%E2%80%AEgnp.safetensors", "xgnp.safetensors"),
    ('attachment; filename="caf\xc3\xa9.safetensors"', "café.safetensors"),  # raw UTF-8, read as latin-1
    ('attachment; filename="a:b|c?.safetensors"', "a_b_c_.safetensors"),
    ('attachment; filename=".."', "105"),  # nothing left: the URL's last part
    (None, "105"),
])
def test_hostile_content_disposition_lands_inside_the_folder(
    fake: FakeStorage, tmp_path: Path, header: str | None, expected: str
) -> None:
    dest = tmp_path / "dest"
    got = download(fake.add("105", Served(LORA, content_disposition=header)), dest)
    assert got.path == dest / expected and got.path.read_bytes() == LORA
    assert only_files(tmp_path) == ["dest"] and only_files(dest) == [expected]


def test_a_long_name_is_cut_before_the_extension() -> None:
    from adapterzoo.zoo.file_names import MAX_NAME_BYTES, safe_file_name

    name = safe_file_name("é" * 300 + ".safetensors")
    assert name is not None and name.endswith("é.safetensors") and len(name.encode()) <= MAX_NAME_BYTES


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_a_login_page_is_refused_however_it_is_labelled(
    fake: FakeStorage, tmp_path: Path, content_type: str
) -> None:
    url = fake.add("113", Served(LOGIN_PAGE, content_type=content_type))
    with pytest.raises(AdapterzooError) as caught:
        download(url, tmp_path, name="model.safetensors", host=CIVITAI)
    assert str(caught.value) == ("Civitai answered with a web page, not a file: this version needs a token, "
                                 "set CIVITAI_API_TOKEN")
    assert only_files(tmp_path) == []


def test_a_login_page_with_a_token_says_the_token_was_not_accepted(fake: FakeStorage, tmp_path: Path) -> None:
    url = fake.add("114", Served(LOGIN_PAGE, content_type="text/html", token="secret"))
    with pytest.raises(AdapterzooError, match="web page, not a file: the token was not accepted for this file"):
        download(url, tmp_path, headers=TOKEN, host=CIVITAI)


@pytest.mark.parametrize("content_type", ["application/json", "binary/octet-stream"])
def test_json_instead_of_a_file_is_refused(fake: FakeStorage, tmp_path: Path, content_type: str) -> None:
    url = fake.add("115", Served(b'{"error": "File not available"}', content_type=content_type))
    with pytest.raises(AdapterzooError, match="^Civitai answered with JSON, not a file"):
        download(url, tmp_path, host=CIVITAI)
    assert only_files(tmp_path) == []


@pytest.mark.parametrize(("key", "served", "headers", "message"), [
    ("116", Served(LORA, token="secret"), None,
     r"^Civitai wants a token for this file \(401 Unauthorized\), set CIVITAI_API_TOKEN$"),
    ("117", Served(LORA, token="secret"), {"Authorization": "Bearer wrong"},
     r"^Civitai refused the token \(401 Unauthorized\): check it is valid"),
    ("118", Served(LORA, status=403), None, r"^Civitai wants a token for this file \(403 Forbidden\)"),
    ("missing", None, None, r"^Civitai has no such file \(404 Not Found\): http://127\.0\.0\.1:\d+/api/download/models/missing$"),
])
def test_refusals_are_one_line(
    fake: FakeStorage, tmp_path: Path, key: str, served: Served | None, headers: dict | None, message: str
) -> None:
    url = fake.add(key, served) if served else f"{fake.url('api')}/api/download/models/{key}"
    with pytest.raises(AdapterzooError, match=message):
        download(url, tmp_path, headers=headers, name="model.safetensors", host=CIVITAI)
    assert only_files(tmp_path) == []


def test_a_refused_connection_is_final_at_once_in_one_line(tmp_path: Path, retry: Retry, sleeps: list[float]) -> None:
    """Issue 14: a refused connection is not retried (a second later it is refused again)."""
    with socket.socket() as sock:  # a port that was just free: connecting to it is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AdapterzooError, match=r"^no network: could not reach Civitai \(.*Connection refused\)$"):
        download(f"http://127.0.0.1:{port}/x", tmp_path, name="x.safetensors", host=CIVITAI, retry=retry)
    assert sleeps == [] and only_files(tmp_path) == []


def test_a_different_file_at_the_name_is_kept_and_ours_lands_beside_it(fake: FakeStorage, tmp_path: Path) -> None:
    theirs = tmp_path / "model.safetensors"
    theirs.write_bytes(b"the user's own file")
    got = download(fake.add("119", Served(LORA)), tmp_path, sha256=SHA)
    assert theirs.read_bytes() == b"the user's own file"
    assert got.path == tmp_path / f"model.{SHA[:10]}.safetensors" and got.beside == theirs
    assert got.path.read_bytes() == LORA

    again = download(fake.add("119", Served(LORA)), tmp_path, name="model.safetensors", sha256=SHA)
    assert again.reused and again.path == got.path and len(fake.requests_to("storage")) == 1


def test_an_identical_file_is_reused_without_asking(fake: FakeStorage, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(LORA)
    got = download(fake.add("120", Served(LORA)), tmp_path, name="model.safetensors", size=len(LORA), sha256=SHA)
    assert got.reused and got.beside is None and fake.seen == []
    assert got.hashes == hash_file(got.path, data_offset=read_header(got.path).data_offset)


def test_an_identical_file_found_after_downloading_is_kept_and_the_copy_dropped(
    fake: FakeStorage, tmp_path: Path
) -> None:
    (tmp_path / "model.safetensors").write_bytes(LORA)
    got = download(fake.add("121", Served(LORA)), tmp_path)  # no SHA256 claimed: must download to know
    assert got.reused and got.path == tmp_path / "model.safetensors" and only_files(tmp_path) == ["model.safetensors"]


def test_two_downloads_of_one_file_at_once_do_not_corrupt_it(fake: FakeStorage, tmp_path: Path) -> None:
    url = fake.add("122", Served(LORA, piece_delay_s=0.01))
    results: list[engine.Downloaded | BaseException] = []

    def pull() -> None:
        try:
            results.append(download(url, tmp_path, name="model.safetensors", sha256=SHA))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(isinstance(r, engine.Downloaded) for r in results), results
    assert sorted(r.reused for r in results) == [False, True]
    assert only_files(tmp_path) == ["model.safetensors"] and (tmp_path / "model.safetensors").read_bytes() == LORA
    assert len(fake.requests_to("storage")) == 1  # the second waited, then found the file done


def test_ctrl_c_leaves_only_the_part_which_the_next_call_resumes(fake: FakeStorage, tmp_path: Path) -> None:
    url = fake.add("123", Served(LORA))
    session = requests.Session()

    def interrupt_after_first_chunk(response: requests.Response, **_: object) -> None:
        chunks = response.iter_content

        def cut(size: int = 1, decode_unicode: bool = False) -> Iterator[bytes]:
            iterator = chunks(size, decode_unicode)
            yield next(iterator)
            raise KeyboardInterrupt

        response.iter_content = cut  # type: ignore[method-assign]

    session.hooks["response"].append(interrupt_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        download(url, tmp_path, name="model.safetensors", session=session)
    assert only_files(tmp_path) == ["model.safetensors.part"]
    assert not [t for t in threading.enumerate() if t.name == "hash_file"]  # the digest threads stopped
    kept = (tmp_path / "model.safetensors.part").stat().st_size
    assert 0 < kept < len(LORA)

    got = download(url, tmp_path, name="model.safetensors", sha256=SHA)
    assert got.resumed_from == kept and got.path.read_bytes() == LORA


def test_a_complete_part_is_checked_and_placed(fake: FakeStorage, tmp_path: Path) -> None:
    """The server answers 416 to a Range past its end: the .part already holds the whole file."""
    (tmp_path / "model.safetensors.part").write_bytes(LORA)
    got = download(fake.add("124", Served(LORA)), tmp_path, name="model.safetensors", sha256=SHA)
    assert got.resumed_from == len(LORA) and got.path.read_bytes() == LORA and got.hashes.sha256 == SHA


def test_the_servers_name_wins_over_the_sources(fake: FakeStorage, tmp_path: Path) -> None:
    url = fake.add("126", Served(LORA, content_disposition='attachment; filename="served.safetensors"'))
    got = download(url, tmp_path, name="listed.safetensors", sha256=SHA)
    assert got.path == tmp_path / "served.safetensors" and only_files(tmp_path) == ["served.safetensors"]


def test_a_206_from_a_changed_file_is_not_spliced_onto_the_old_part(fake: FakeStorage, tmp_path: Path) -> None:
    """A server that ignores If-Range but names the new version in its ETag: start over, don't splice."""
    part = tmp_path / "model.safetensors.part"
    part.write_bytes(b"\x07" * 4096)
    os.setxattr(part, engine.VALIDATOR_ATTR, b'"v1"')
    got = download(fake.add("127", Served(LORA, etag='"v2"', ignore_if_range=True)), tmp_path,
                   name="model.safetensors")
    assert [s.headers.get("Range") for s in fake.requests_to("storage")] == ["bytes=4096-", None]
    assert got.resumed_from == 0 and got.path.read_bytes() == LORA


def test_a_part_longer_than_the_file_now_is_started_over(fake: FakeStorage, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.part").write_bytes(b"\x07" * (len(LORA) + 10))
    got = download(fake.add("128", Served(LORA)), tmp_path, name="model.safetensors", sha256=SHA)
    assert [s.headers.get("Range") for s in fake.requests_to("storage")] == [f"bytes={len(LORA) + 10}-", None]
    assert got.resumed_from == 0 and got.path.read_bytes() == LORA


def test_the_progress_bar_stays_off_when_stderr_is_not_a_terminal(
    fake: FakeStorage, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    download(fake.add("129", Served(LORA)), tmp_path, progress_bar=True)
    assert capfd.readouterr().err == ""


def test_a_url_that_is_not_one_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(AdapterzooError, match=r"^cannot download: Invalid URL .x.: No scheme supplied"):
        download("x", tmp_path, name="x.safetensors")
    assert only_files(tmp_path) == []
