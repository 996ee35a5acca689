"""The fakes answer as the real services do: huggingface_hub's own client reads the fake Hub unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import requests
from factory import small_lora
from fake_civitai import FakeCivitai
from fake_hub import FakeHub


def test_hf_hub_download_follows_the_lfs_redirect_without_auth(fake_hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    lora = small_lora(tmp_path / "src" / "pytorch_lora_weights.safetensors")
    repo = fake_hub.add_repo("alice/tiny-lora", {"pytorch_lora_weights.safetensors": lora, "README.md": b"# tiny\n"},
                             tags=["lora", "base_model:adapter:stabilityai/stable-diffusion-xl-base-1.0"])
    info = HfApi().model_info("alice/tiny-lora", files_metadata=True)
    sibling = {s.rfilename: s for s in info.siblings}["pytorch_lora_weights.safetensors"]
    assert info.sha == repo.commit
    assert sibling.size == lora.stat().st_size
    assert sibling.lfs.sha256 == hashlib.sha256(lora.read_bytes()).hexdigest()
    got = hf_hub_download("alice/tiny-lora", "pytorch_lora_weights.safetensors", token="hf_secret",
                          cache_dir=tmp_path / "cache")
    assert Path(got).read_bytes() == lora.read_bytes()
    readme = hf_hub_download("alice/tiny-lora", "README.md", cache_dir=tmp_path / "cache")
    assert Path(readme).read_bytes() == b"# tiny\n"
    storage = [r for r in fake_hub.requests if r["server"] == "storage"]
    assert storage and all(r["authorization"] is None for r in storage)
    assert [m.id for m in HfApi().list_models(search="tiny", filter=["lora"])] == ["alice/tiny-lora"]


def test_list_models_pages_through_link_headers(fake_hub: FakeHub) -> None:
    from huggingface_hub import HfApi

    for i in range(5):
        fake_hub.add_repo(f"bob/lora-{i}", {"a.safetensors": bytes([i]) * 10}, tags=["lora"], downloads=i)
    from huggingface_hub.utils import _pagination

    seen = [m["id"] for m in _pagination.paginate(f"{fake_hub.url}/api/models", {"limit": 2, "sort": "downloads"}, {})]
    assert seen == [f"bob/lora-{i}" for i in (4, 3, 2, 1, 0)]
    assert len([r for r in fake_hub.requests if r["path"] == "/api/models"]) == 3
    assert len(list(HfApi().list_models(search="lora", limit=3))) == 3


def test_fake_civitai_serves_true_hashes_by_any_hash_type(fake_civitai: FakeCivitai, tmp_path: Path) -> None:
    lora = small_lora(tmp_path / "a.safetensors")
    model = fake_civitai.add_model("Tiny", [lora], trained_words=["tinytok"])
    version = model.versions[0]
    sha256 = hashlib.sha256(lora.read_bytes()).hexdigest()
    for digest in (sha256, sha256.upper(), sha256[:10]):
        body = requests.get(f"{fake_civitai.url}/api/v1/model-versions/by-hash/{digest}", timeout=5).json()
        assert body["id"] == version.id and body["files"][0]["hashes"]["SHA256"] == sha256.upper()
    assert requests.get(f"{fake_civitai.url}/api/v1/model-versions/by-hash/{'0' * 64}", timeout=5).status_code == 404
    found = requests.post(f"{fake_civitai.url}/api/v1/model-versions/by-hash", json=[sha256, "1" * 64], timeout=5)
    assert [v["id"] for v in found.json()] == [version.id]
    fake_civitai.throttle(1, "7")
    throttled = requests.get(f"{fake_civitai.url}/api/v1/models/{model.id}", timeout=5)
    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "7")
