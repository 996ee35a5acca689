"""`adapterzoo serve`'s JSON API through FastAPI's TestClient: the CLI's --json shapes, jobs against the fake
Civitai and Hub, images by id only, and the security checks (Host, token, CSRF, Origin)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import run
from factory import small_lora
from fake_civitai import FakeCivitai, tiny_png
from fake_hub import FakeHub
from safetensors.torch import load_file, save_file
from web_server import HOST, PORT, client, csrf

from adapterzoo.formats.model.registry import bases
from adapterzoo.web.security import CSP


def cli_json(capsys, monkeypatch, *args: str) -> Any:
    code, out, err = run([*args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def library(tmp_path: Path, capsys, monkeypatch) -> Path:
    """A scanned folder: two SD1 LoRAs (one with a preview and training tags) and an SDXL one; the registry."""
    models = tmp_path / "models" / "Lora"
    small_lora(models / "alpha.safetensors", seed=1)
    tagged = models / "beta.safetensors"
    tensors = load_file(small_lora(tagged, seed=2))
    save_file(tensors, str(tagged), metadata={"ss_base_model_version": "sd_v1",
                                              "ss_tag_frequency": json.dumps({"10_set": {"knight": 9, "red": 3}})})
    (models / "beta.preview.png").write_bytes(tiny_png((10, 200, 10)))
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(5120, 4)},
              str(models / "xl.safetensors"))
    db = tmp_path / "reg.db"
    assert run(["--db", str(db), "scan", str(models)], capsys, monkeypatch)[0] == 0
    return db


def wait_for(api, job: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while job["state"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
        job = api.get(f"/api/jobs/{job['id']}").json()
    return job


def test_files_are_list_json_rows_filtered_sorted_and_paged(library: Path, capsys, monkeypatch) -> None:
    api = client(library)
    listed = cli_json(capsys, monkeypatch, "--db", str(library), "list")
    answer = api.get("/api/files", params={"per_page": 500})
    assert answer.status_code == 200 and answer.headers["x-total-count"] == "3"
    assert sorted(answer.json(), key=lambda r: r["id"]) == sorted(listed, key=lambda r: r["id"])

    names = [r["name"] for r in api.get("/api/files").json()]
    assert names == ["alpha.safetensors", "beta.safetensors", "xl.safetensors"]
    by_size = api.get("/api/files", params={"sort": "size"}).json()
    assert [r["size"] for r in by_size] == sorted((r["size"] for r in by_size), reverse=True)
    assert [r["name"] for r in api.get("/api/files", params={"base": "sdxl"}).json()] == ["xl.safetensors"]
    assert [r["name"] for r in api.get("/api/files", params={"q": "KNIGHT"}).json()] == ["beta.safetensors"]
    assert api.get("/api/files", params={"verdict": "never", "status": "ok"}).headers["x-total-count"] == "3"

    first = api.get("/api/files", params={"per_page": 2})
    assert [r["name"] for r in first.json()] == names[:2]
    assert 'rel="next"' in first.headers["link"] and "page=2" in first.headers["link"]
    second = api.get("/api/files", params={"per_page": 2, "page": 2})
    assert [r["name"] for r in second.json()] == names[2:] and "link" not in second.headers

    wrong = api.get("/api/files", params={"base": "sd9"})
    every_base = ", ".join((*bases(), "unknown"))
    assert wrong.status_code == 400 and wrong.json() == {"error": f"base is one of {every_base}, not 'sd9'"}


def test_a_file_is_show_json_with_tags_counted_and_its_block_norms(library: Path, capsys, monkeypatch) -> None:
    api = client(library)
    beta = next(r for r in api.get("/api/files").json() if r["name"] == "beta.safetensors")
    shown = cli_json(capsys, monkeypatch, "--db", str(library), "show", str(beta["id"]))
    detail = api.get(f"/api/files/{beta['id']}").json()
    assert detail == shown
    assert detail["training_tags"] == [{"tag": "knight", "count": 9}, {"tag": "red", "count": 3}]
    assert detail["verifications"] == [] and detail["provenance"] is None
    assert api.get("/api/files/999").status_code == 404

    (block,) = api.get(f"/api/files/{beta['id']}/blocks").json()
    tensors = load_file(beta["path"])
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down = (tensors[f"{stem}.lora_{p}.weight"].double() for p in ("up", "down"))
    expected = float((up @ down).norm()) * float(tensors[f"{stem}.alpha"]) / 4
    assert (block["component"], block["label"], block["modules"]) == ("unet", "down 0", 1)
    assert block["norm"] == pytest.approx(expected, rel=1e-6)
    svg = api.get(f"/media/files/{beta['id']}/blocks.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and "down 0" in svg.text


def test_images_are_served_by_id_as_cached_thumbnails_and_never_outside_their_place(
        library: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    api = client(library)
    rows = {r["name"]: r for r in api.get("/api/files").json()}
    card = api.get(f"/media/files/{rows['beta.safetensors']['id']}/card", follow_redirects=False)
    assert card.status_code == 302 and card.headers["location"].startswith("/media/thumbs/")
    thumb = api.get(card.headers["location"])
    assert thumb.headers["content-type"] == "image/webp" and "immutable" in thumb.headers["cache-control"]
    again = api.get(card.headers["location"], headers={"If-None-Match": thumb.headers["etag"]})
    assert again.status_code == 304
    assert api.get(f"/media/files/{rows['beta.safetensors']['id']}/preview").content == tiny_png((10, 200, 10))

    # A preview beside a file that is a link out of its folder is not served, image or not.
    secret = tmp_path / "secret.png"
    secret.write_bytes(tiny_png())
    (Path(rows["alpha.safetensors"]["path"]).parent / "alpha.preview.png").symlink_to(secret)
    assert run(["--db", str(library), "scan", str(tmp_path / "models")], capsys, monkeypatch)[0] == 0
    assert api.get(f"/api/files/{rows['alpha.safetensors']['id']}").json()["preview_path"]
    assert api.get(f"/media/files/{rows['alpha.safetensors']['id']}/preview").status_code == 404
    for path in ("/media/thumbs/..%2F..%2Fregistry.db", "/media/thumbs/not-hex.webp", "/static/../../registry.db"):
        assert api.get(path).status_code == 404


def test_search_is_search_json_with_have_and_the_description_as_text(
        library: Path, fake_civitai: FakeCivitai, fake_hub: FakeHub, tmp_path: Path, capsys, monkeypatch) -> None:
    have = tmp_path / "models" / "Lora" / "alpha.safetensors"
    model = fake_civitai.add_model("Knight LoRA", [have], trained_words=["kn1ght"])
    model.description = '<p>Great <b>knight</b></p><script>alert(1)</script><img src=x onerror="alert(2)">'
    fake_hub.add_repo("someone/knight-lora", {"k.safetensors": small_lora(tmp_path / "src" / "k.safetensors")},
                      tags=["lora", "base_model:runwayml/stable-diffusion-v1-5"])
    api = client(library)
    answer = api.get("/api/search", params={"q": "knight"}).json()
    assert answer == cli_json(capsys, monkeypatch, "--db", str(library), "search", "knight")
    civitai = next(h for h in answer if h["source"] == "civitai")
    assert civitai["description"] == "Great knight" and civitai["in_registry"]
    assert civitai["image"].startswith(fake_civitai.url)
    page = api.get("/search", params={"q": "knight"}).text
    assert "Great knight" in page and "alert" not in page and "have" in page


def test_a_pull_job_reports_bytes_and_its_result_and_the_file_is_registered(
        library: Path, fake_civitai: FakeCivitai, tmp_path: Path) -> None:
    data_file = small_lora(tmp_path / "src" / "knight.safetensors", seed=7)
    version = fake_civitai.add_model("Tiny Knight", [data_file], trained_words=["kn1ght"]).versions[0]
    api = client(library, library=tmp_path / "lib")
    started = api.post("/api/jobs", json={"action": "pull", "refs": [f"civitai:{version.id}"]}, headers=csrf(api))
    assert started.status_code == 201, started.text
    job = wait_for(api, started.json())
    assert job["state"] == "done", job
    (result,) = job["results"]
    assert result["status"] == "pulled" and Path(result["path"]) == tmp_path / "lib/models/Lora/knight.safetensors"
    assert job["progress"]["bytes"] == job["progress"]["total"] == data_file.stat().st_size
    shown = api.get(f"/api/files/{result['id']}").json()
    assert shown["sources"][0]["civitai_version_id"] == version.id and shown["sources"][0]["trained_words"] == ["kn1ght"]

    with api.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
        events = [line for line in stream.iter_lines() if line.startswith("event:")]
    assert events[0] == "event: state" and "event: progress" in events and "event: result" in events
    assert events[-1] == "event: state"


def test_a_cancelled_pull_stops_and_leaves_its_part_to_resume(
        library: Path, fake_civitai: FakeCivitai, tmp_path: Path) -> None:
    big = tmp_path / "src" / "big.safetensors"
    big.parent.mkdir()
    save_file({"x": torch.zeros(1 << 20)}, str(big))
    version = fake_civitai.add_model("Big", [big]).versions[0]
    fake_civitai.served(version.id).piece_delay_s = 0.05
    api = client(library, library=tmp_path / "lib")
    job = api.post("/api/jobs", json={"action": "pull", "refs": [f"civitai:{version.id}"]}, headers=csrf(api)).json()
    deadline = time.monotonic() + 30
    while not api.get(f"/api/jobs/{job['id']}").json()["progress"].get("bytes"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert api.post(f"/api/jobs/{job['id']}/cancel", headers=csrf(api)).status_code == 200
    job = wait_for(api, job)
    assert job["state"] == "cancelled" and job["results"] == []
    parts = list((tmp_path / "lib").rglob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < big.stat().st_size


def test_bad_job_requests_are_one_line_400s(library: Path) -> None:
    api = client(library)
    headers = csrf(api)
    assert api.post("/api/jobs", json={"action": "scan", "paths": ["/no/such/dir"]}, headers=headers).json() == {
        "error": "scan: no such folder or file: /no/such/dir"}
    assert api.post("/api/jobs", json={"action": "verify", "ids": [1]}, headers=headers).status_code == 400
    assert api.post("/api/jobs", json={"action": "format-disk"}, headers=headers).status_code == 422
    assert api.get("/api/jobs/77").status_code == 404


def test_a_scan_job_indexes_a_folder(library: Path, tmp_path: Path) -> None:
    small_lora(tmp_path / "more" / "gamma.safetensors", seed=3)
    api = client(library)
    job = wait_for(api, api.post("/api/jobs", json={"action": "scan", "paths": [str(tmp_path / "more")]},
                                 headers=csrf(api)).json())
    assert job["state"] == "done" and job["results"][0]["indexed"] == 1
    assert api.get("/api/files", params={"q": "gamma"}).headers["x-total-count"] == "1"


def test_trash_moves_the_file_and_its_sidecars_and_the_history_says_so(
        library: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    api = client(library)
    beta = next(r for r in api.get("/api/files").json() if r["name"] == "beta.safetensors")
    answer = api.post(f"/api/files/{beta['id']}/trash", headers=csrf(api))
    assert answer.status_code == 200, answer.text
    assert not Path(beta["path"]).exists() and not Path(beta["path"]).with_suffix(".preview.png").exists()
    trashed = sorted(p.name for p in (tmp_path / "xdg" / "Trash" / "files").iterdir())
    assert trashed == ["beta.preview.png", "beta.safetensors"]
    detail = api.get(f"/api/files/{beta['id']}").json()
    assert detail["status"] == "missing"
    assert [(e["action"], e["path"], e["detail"]["sidecars"]) for e in detail["history"]] == [
        ("trash", beta["path"], [str(Path(beta["path"]).with_suffix(".preview.png"))])]


def test_dupes_updates_and_disk_use_are_the_commands_json(library: Path, tmp_path: Path, fake_civitai: FakeCivitai,
                                                          capsys, monkeypatch) -> None:
    copy = tmp_path / "ComfyUI" / "models" / "loras" / "alpha.safetensors"
    copy.parent.mkdir(parents=True)
    copy.write_bytes((tmp_path / "models" / "Lora" / "alpha.safetensors").read_bytes())
    model = fake_civitai.add_model("Tiny Alpha", [copy])
    newer = fake_civitai.add_version(model, [small_lora(tmp_path / "offered" / "alpha_v2.safetensors", seed=9)],
                                     "SD 1.5", [])
    assert run(["--db", str(library), "scan", str(copy.parent)], capsys, monkeypatch)[0] == 0
    assert run(["--db", str(library), "enrich", "--all"], capsys, monkeypatch)[0] == 0
    api = client(library)

    for by in ("sha256", "name"):
        groups = api.get("/api/dupes", params={"by": by}).json()
        assert groups == cli_json(capsys, monkeypatch, "--db", str(library), "dupes", "--by", by)
    (group,) = api.get("/api/dupes").json()
    assert sorted(c["path"] for c in group["copies"]) == sorted([str(copy), str(tmp_path / "models" / "Lora" / "alpha.safetensors")])
    assert group["bytes_freed"] == copy.stat().st_size
    for by in ("kind", "root"):
        assert api.get("/api/du", params={"by": by}).json() == cli_json(capsys, monkeypatch, "--db", str(library),
                                                                         "du", "--by", by)
    updates = api.get("/api/updates").json()
    assert updates == cli_json(capsys, monkeypatch, "--db", str(library), "updates")
    (alpha,) = updates
    assert (alpha["status"], [o["version_id"] for o in alpha["newer"]]) == ("update", [newer.id])

    assert api.get("/api/dupes", params={"by": "size"}).status_code == 400
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("CIVITAI_BASE_URL", f"http://127.0.0.1:{port}")
    offline = api.get("/api/updates")
    assert offline.status_code == 502 and "no network" in offline.json()["error"]


@pytest.fixture
def cared_for(library: Path, fake_civitai: FakeCivitai, tmp_path: Path, capsys, monkeypatch) -> dict[str, Any]:
    """The library plus: Knight v1 pulled (Civitai has a v2) and a second copy of alpha in a ComfyUI folder."""
    knight = fake_civitai.add_model("Tiny Knight", [small_lora(tmp_path / "src" / "knight.safetensors", seed=5)])
    v2 = fake_civitai.add_version(knight, [small_lora(tmp_path / "src" / "knight_v2.safetensors", seed=6)],
                                  "SD 1.5", [], name="v2.0")
    db = ["--db", str(library)]
    code, _, err = run([*db, "pull", f"civitai:{knight.versions[-1].id}", "--library", str(tmp_path / "lib")],
                       capsys, monkeypatch)
    assert code == 0, err
    comfy = tmp_path / "comfy" / "models" / "loras"
    comfy.mkdir(parents=True)
    shutil.copyfile(tmp_path / "models" / "Lora" / "alpha.safetensors", comfy / "alpha.safetensors")
    assert run([*db, "roots", "add", str(comfy), "--layout", "comfyui", "--kind", "lora"], capsys, monkeypatch)[0] == 0
    assert run([*db, "scan", str(comfy)], capsys, monkeypatch)[0] == 0
    return {"db": library, "v2": v2.id, "comfy": comfy}


def test_dupes_du_and_updates_are_the_commands_json(cared_for: dict[str, Any], capsys, monkeypatch) -> None:
    db = ["--db", str(cared_for["db"])]
    api = client(cared_for["db"])
    dupes = api.get("/api/dupes").json()
    assert dupes == cli_json(capsys, monkeypatch, *db, "dupes")
    (group,) = dupes
    assert len(group["copies"]) == 2 and group["bytes_freed"] == group["copies"][0]["size"]
    assert api.get("/api/dupes", params={"by": "name"}).json() == cli_json(capsys, monkeypatch, *db, "dupes",
                                                                            "--by", "name")
    for by in ("kind", "base", "root", "source"):
        assert api.get("/api/du", params={"by": by}).json() == cli_json(capsys, monkeypatch, *db, "du", "--by", by)
    assert api.get("/api/du", params={"by": "colour"}).status_code == 400
    assert api.get("/api/dupes", params={"by": "colour"}).status_code == 400

    updates = api.get("/api/updates").json()
    assert updates == cli_json(capsys, monkeypatch, *db, "updates")
    (knight,) = updates
    assert knight["status"] == "update" and [o["version_id"] for o in knight["newer"]] == [cared_for["v2"]]


def test_the_care_pages_render_and_the_library_marks_files_with_an_update(cared_for: dict[str, Any]) -> None:
    api = client(cared_for["db"])
    before = api.get("/", params={"update": "available"})
    assert "updates not checked yet" in before.text and 'data-id="' not in before.text
    page = api.get("/updates").text
    assert f'data-ref="civitai:{cared_for["v2"]}"' in page and "v2.0" in page and "Tiny Knight" in page
    marked = api.get("/", params={"update": "available"}).text
    assert marked.count('class="card ') == 1 and "update available" in marked and "Tiny Knight" in marked
    assert "update available" not in api.get("/", params={"q": "alpha"}).text
    dupes = api.get("/dupes").text
    assert str(cared_for["comfy"] / "alpha.safetensors") in dupes and "to free" in dupes
    disk = api.get("/disk", params={"by": "root"})
    groups = [row["group"] for row in api.get("/api/du", params={"by": "root"}).json()]
    assert disk.text.count("<rect") == len(groups) >= 2 and all(f"<title>{g}: " in disk.text for g in groups)
    roots = api.get("/", params={"root": str(cared_for["comfy"])}).text
    assert roots.count('class="card ') == 1 and "alpha.safetensors" in roots

    alpha = next(r for r in api.get("/api/files", params={"q": "alpha"}).json())
    shown = api.get(f"/files/{alpha['id']}").text
    assert shown.count('class="location') == 2 and str(cared_for["comfy"] / "alpha.safetensors") in shown


def test_the_docs_are_offline_and_every_answer_carries_the_security_headers(library: Path) -> None:
    api = client(library)
    docs = api.get("/docs")
    assert docs.status_code == 200 and "/api/files" in docs.text and "/api/jobs/{job_id}/events" in docs.text
    assert "https://" not in docs.text.replace("https://civitai.com", "")
    assert api.get("/openapi.json").json()["info"]["title"] == "adapterzoo"
    for path in ("/", "/api/files", "/docs", "/static/style.css"):
        headers = api.get(path).headers
        assert headers["content-security-policy"] == CSP and headers["x-content-type-options"] == "nosniff"


def test_requests_for_another_host_are_refused(library: Path) -> None:
    api = client(library)
    assert api.get("/", headers={"Host": "evil.example"}).status_code == 403
    assert api.get("/", headers={"Host": f"evil.example:{PORT}"}).status_code == 403
    assert api.get("/", headers={"Host": f"localhost:{PORT}"}).status_code == 200


def test_state_changes_need_the_session_csrf_token_and_the_same_origin(library: Path, tmp_path: Path) -> None:
    api = client(library)
    body = {"action": "scan", "paths": [str(tmp_path)]}
    good = csrf(api)
    assert api.post("/api/jobs", json=body).status_code == 403
    assert api.post("/api/jobs", json=body, headers={**good, "Origin": "http://evil.example"}).status_code == 403
    assert api.post("/api/jobs", json=body, headers={**good, "X-CSRF-Token": "0" * 64}).status_code == 403
    assert api.post("/api/jobs", json=body, headers={**good, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    other = client(library)  # another session: its token is not this one's
    assert other.post("/api/jobs", json=body, headers=good).status_code == 403
    assert api.get("/api/jobs").json() == []
    assert api.post("/api/jobs", json=body, headers=good).status_code == 201


def test_beyond_loopback_every_request_needs_the_access_token(library: Path) -> None:
    from adapterzoo.web.server import build

    app, guard = build(str(library), "192.0.2.7", PORT)
    assert guard.token and guard.url() == f"http://192.0.2.7:{PORT}/?token={guard.token}"
    from fastapi.testclient import TestClient

    api = TestClient(app, base_url=f"http://192.0.2.7:{PORT}")
    assert api.get("/").status_code == 403 and api.get("/api/files").status_code == 403
    assert api.get("/api/files", headers={"Authorization": f"Bearer {guard.token}"}).status_code == 200
    assert api.get("/", params={"token": "wrong"}).status_code == 403
    assert api.get("/", params={"token": guard.token}).status_code == 200
    assert api.get("/api/files").status_code == 200  # the token is now a cookie
    assert api.get("/", headers={"Host": f"{HOST}:{PORT}"}).status_code == 403


def test_serve_prints_its_url_and_answers_there(library: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen([sys.executable, "-m", "adapterzoo", "--db", str(library), "serve", "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        assert line.strip() == f"adapterzoo serve: http://{HOST}:{port}/", server.stderr.read()
        import requests

        deadline = time.monotonic() + 60
        while True:
            try:
                answer = requests.get(f"http://{HOST}:{port}/api/files", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.1)
        assert answer.status_code == 200 and answer.headers["x-total-count"] == "3"
    finally:
        server.terminate()
        server.wait(20)


def test_serve_on_a_port_in_use_says_so_in_one_line(library: Path, capsys, monkeypatch) -> None:
    import socket

    with socket.create_server((HOST, 0)) as taken:
        port = taken.getsockname()[1]
        code, out, err = run(["--db", str(library), "serve", "--port", str(port)], capsys, monkeypatch)
    assert code == 1 and out == ""
    assert err.startswith(f"error: cannot listen on {HOST}:{port}: ") and len(err.strip().splitlines()) == 1


def by_name_in_python(engine, chosen, here: str) -> list[int]:
    """The name order as the library had it when it sorted in Python (the spec name_key and its index keep):
    each file by the lower-cased last part of its first location here (this host's or shared, present before
    missing, then by stored path), then by id; files no such location names last, by id."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from adapterzoo.zoo.models import FileEntry, Location
    from adapterzoo.zoo.queries import _filtered

    with Session(engine) as session:
        ids = set(session.scalars(_filtered(select(FileEntry.id), chosen)))
        places: dict[int, list[tuple[bool, str]]] = {i: [] for i in ids}
        for file_id, host, path, missing in session.execute(select(Location.file_id, Location.host, Location.path,
                                                                   Location.missing)):
            if file_id in ids and host in (here, "*"):
                places[file_id].append((missing, path))
    names = {i: min(p)[1].rpartition("/")[2].lower() if p else None for i, p in places.items()}
    return sorted(ids, key=lambda i: (names[i] is None, names[i] or "", i))


def test_name_order_pages_are_the_python_sort_of_file_names_on_both_backends(registry_db: str, monkeypatch) -> None:
    """Sorting by name reads ix_locations_host_name_key a page at a time; the order is still Python's: names
    ignoring case as str.lower() folds it (É, İ, ß too), compared code point by code point on PostgreSQL as on
    SQLite; a file by its first location here (present first, then by path, shared roots included), once; files
    only another host holds come last, on pages of any size."""
    import random
    from datetime import datetime

    from sqlalchemy import insert

    from adapterzoo.zoo.db import connect
    from adapterzoo.zoo.models import FileEntry, Location, Root, RootMount
    from adapterzoo.zoo.queries import FileFilter, page_entries

    monkeypatch.setenv("ADAPTERZOO_HOST", "studio")
    engine = connect(registry_db)
    rng = random.Random(5)
    when = datetime(2025, 1, 1)
    stems = ["alpha", "Alpha", "ALPHA_2", "beta", "Éclair", "eclair", "zeta", "İstanbul", "istanbul", "straße",
             "STRASSE", "a b", "a_b", "a-b", "ab", "Z", "_x", "~tilde", "日本", "42", "same", "same"]
    files, places = [], []
    for i, stem in enumerate(stems * 3, start=1):
        files.append({"id": i, "is_folder": False, "size": i, "sha256": f"{i:064x}",
                      "kind": rng.choice(["lora", "vae"]), "base": "sd1", "tensors": 1, "metadata": "{}",
                      "details": "{}", "warnings": "[]", "trigger_words": "[]", "unsafe": False, "first_seen": when,
                      "last_seen": when})
        hosts = rng.choice([["studio"], ["studio"], ["studio", "studio"], ["*"], ["studio", "*"], ["laptop"],
                            ["laptop", "studio"]])
        for n, host in enumerate(hosts):
            folder = rng.choice(["/m/a", "/m/B", "/share/loras"] if host == "*" else ["/m/a", "/m/B", "/m/c"])
            name = stem if n == 0 else rng.choice(stems)
            places.append({"file_id": i, "host": host, "path": f"{folder}/{name}-{i}-{n}.safetensors", "size": i,
                           "mtime_ns": 0, "missing": rng.random() < 0.3, "first_seen": when, "last_seen": when,
                           "root_id": 1 if host == "*" else None})
    places.append({**places[0], "host": "*", "root_id": 1})  # the same stored path here and on a shared root
    with engine.begin() as connection:
        connection.execute(insert(Root.__table__).values(id=1, host="*", path="/share", layout="plain",
                                                         added=when))
        connection.execute(insert(RootMount.__table__).values(root_id=1, host="studio", path="/mnt/share"))
        connection.execute(insert(FileEntry.__table__), files)
        connection.execute(insert(Location.__table__), places)  # name_key: the column's default, from the path
    for chosen in (FileFilter(), FileFilter(kind="lora"), FileFilter(query="STRA"), FileFilter(host="laptop")):
        expected = by_name_in_python(engine, chosen, "studio")
        for per_page in (1, 4, 7, 500):
            got: list[int] = []
            for page in range(1, len(expected) // per_page + 3):
                entries, total = page_entries(engine, chosen, "name", page, per_page)
                assert total == len(expected)
                got += [e.id for e in entries]
            assert got == expected, (chosen, per_page)
    engine.dispose()
