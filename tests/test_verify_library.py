"""`verify --registry` and `verify --out-dir`: a library verified in bulk, each file on its base's checkpoint,
bad entries reported without being opened, and a contact sheet that opens offline."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from cli_helpers import run
from safetensors.torch import save_file
from test_verify import kohya_file

from adapterzoo import tiny_models

# --grid: these runs check grids and the contact sheet, and --registry on a CPU is --quick unless told
FAST = ["--steps", "1", "--size", "64x64", "--multiplier", "0", "--multiplier", "1", "--grid"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class Sheet(HTMLParser):
    """What a browser would show of index.html: cards (their data attributes), image and link targets, text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cards: list[dict[str, str]] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.scripts_with_src = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "div" and found.get("class") == "card":
            self.cards.append(found)
        if tag in ("img", "a", "link"):
            self.links.append(found.get("src") or found.get("href") or "")
        if tag == "script" and "src" in found:
            self.scripts_with_src += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def sheet_of(folder: Path) -> Sheet:
    sheet = Sheet((folder / "index.html").read_text(encoding="utf-8"))
    for link in sheet.links:  # relative, inside the folder, present: it opens offline
        assert "//" not in link and not link.startswith("/")
        assert (folder / unquote(link)).is_file(), link
    assert sheet.scripts_with_src == 0
    return sheet


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_models.save_tiny_pipeline("sd1", tmp_path_factory.mktemp("sd1") / "tiny-sd1", seed=1)


class Runs:
    def __init__(self, capsys, monkeypatch):
        self.capsys, self.monkeypatch = capsys, monkeypatch

    def __call__(self, *args: str) -> tuple[int, str, str]:
        return run([str(a) for a in args], self.capsys, self.monkeypatch)


@pytest.fixture
def cli(capsys, monkeypatch) -> Runs:
    return Runs(capsys, monkeypatch)


def library(root: Path, checkpoint: Path) -> Path:
    """An A1111-style folder: the checkpoint, a good and a zero LoRA, a truncated and an unsafe file, an SDXL
    LoRA (no SDXL checkpoint here), and a LoRA that will be overwritten with garbage after the scan."""
    models = root / "models"
    (models / "Lora").mkdir(parents=True)
    shutil.copytree(checkpoint, models / "Stable-diffusion" / "tiny-sd1")
    pipe = tiny_models.tiny_pipeline("sd1", 1)
    good = kohya_file(pipe, "sd1", models / "Lora" / "good.safetensors")
    kohya_file(pipe, "sd1", models / "Lora" / "zero.safetensors", zero_up=True)
    kohya_file(pipe, "sd1", models / "Lora" / "changed.safetensors", std=0.2)  # its own bytes: a file of its own
    (models / "Lora" / "half.safetensors").write_bytes(good.read_bytes()[:1000])
    with open(models / "Stable-diffusion" / "needs-code.ckpt", "wb") as fh:
        pickle.dump({"state_dict": print}, fh)
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(5120, 4)},
              str(models / "Lora" / "xl.safetensors"))
    return models


def test_registry_verifies_each_file_on_its_base_and_reports_bad_entries_unopened(checkpoint, tmp_path, cli,
                                                                                  registry_db):
    models = library(tmp_path, checkpoint)
    assert cli("scan", models)[0] == 0
    (models / "Lora" / "changed.safetensors").write_bytes(b"not a safetensors file at all")
    out = tmp_path / "out"
    code, stdout, stderr = cli("verify", "--registry", "--out-dir", out, *FAST, "--json")
    assert code == 1, stderr
    results = {Path(r["file"]).name: r for r in json.loads(stdout)}
    assert set(results) == {"good.safetensors", "zero.safetensors", "changed.safetensors", "half.safetensors",
                            "needs-code.ckpt", "xl.safetensors"}  # the checkpoint is what they render on
    assert {n: r["verdict"] for n, r in results.items()} == {n: "pass" if n == "good.safetensors" else "fail"
                                                             for n in results}
    assert results["zero.safetensors"]["reasons"] == ["no effect: every lora_up is zero"]
    assert results["xl.safetensors"]["reasons"] == ["no checkpoint for sdxl: give --checkpoint-for sdxl=CKPT"]
    assert results["half.safetensors"]["skipped"] == "broken"
    assert results["needs-code.ckpt"]["skipped"] == "unsafe"
    assert results["needs-code.ckpt"]["reasons"][0].startswith("unsafe: ")
    changed = results["changed.safetensors"]
    assert changed["skipped"] is None and changed["coverage"] is None and len(changed["reasons"]) == 1
    assert Path(results["good.safetensors"]["checkpoint"]) == models / "Stable-diffusion" / "tiny-sd1"

    for name in ("good.safetensors", "zero.safetensors"):
        grid = Path(results[name]["grid"])
        assert grid == out / f"{Path(name).stem}-{sha256(models / 'Lora' / name)[:10]}.png" and grid.is_file()
    sheet = sheet_of(out)
    assert len(sheet.cards) == len(results)
    assert sorted(c["data-verdict"] for c in sheet.cards) == ["fail"] * 5 + ["pass"]
    assert len([link for link in sheet.links if link.endswith(".png")]) == 4  # img + link, two grids
    assert "3 verified: 1 pass, 2 fail; 3 skipped (1 broken, 1 unsafe, 1 no checkpoint); 1 left out (checkpoint)" \
           in sheet.text

    code, stdout, _ = cli("list", "--verdict", "fail", "--json")
    assert sorted(Path(r["path"]).name for r in json.loads(stdout)) == ["changed.safetensors", "zero.safetensors"]
    code, stdout, _ = cli("show", models / "Lora" / "changed.safetensors")
    assert "verified       fail on" in stdout

    # Only what was never verified, of one kind: the checkpoint, rendered alone. A table, the summary, the sheet.
    code, stdout, stderr = cli("verify", "--registry", "--unverified", "--kind", "checkpoint", "--out-dir", out, *FAST)
    assert code == 0, stderr
    assert stdout.splitlines()[0].split() == ["VERDICT", "KIND", "BASE", "NAME", "WHY"]
    assert stdout.splitlines()[1].split() == ["pass", "checkpoint", "sd1", "tiny-sd1"]
    assert "1 verified: 1 pass, 0 fail\n" in stdout
    assert f"contact sheet {out / 'index.html'}" in stdout
    assert len(sheet_of(out).cards) == 1  # the sheet is this run's
    code, stdout, _ = cli("list", "--verdict", "never", "--json")
    assert sorted(Path(r["path"]).name for r in json.loads(stdout)) == ["half.safetensors", "needs-code.ckpt",
                                                                         "xl.safetensors"]


def test_several_checkpoints_of_a_base_need_checkpoint_for(checkpoint, tmp_path, cli):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(checkpoint, models / "a")
    shutil.copytree(checkpoint, models / "b")
    (models / "b" / "README.md").write_text("b")  # another content: identical copies would be one checkpoint
    kohya_file(tiny_models.tiny_pipeline("sd1", 1), "sd1", models / "style.safetensors")
    assert cli("scan", models)[0] == 0
    code, stdout, _ = cli("verify", "--registry", "--out-dir", tmp_path / "out", *FAST, "--json")
    assert code == 1
    assert json.loads(stdout)[0]["reasons"] == ["2 sd1 checkpoints indexed, which one? give --checkpoint-for "
                                                "sd1=CKPT"]
    code, stdout, stderr = cli("verify", "--registry", "--out-dir", tmp_path / "out", *FAST, "--json",
                               "--checkpoint-for", f"sd1={models / 'b'}")
    assert code == 0, stderr
    (result,) = json.loads(stdout)
    assert (result["verdict"], Path(result["checkpoint"])) == ("pass", models / "b")


@pytest.mark.parametrize("args, message", [
    (["FILE", "--registry", "--out-dir", "out"], "give FILE... or --registry, not both"),
    (["--registry"], "--registry writes to --out-dir DIR"),
    (["--registry", "--out-dir", "out", "--checkpoint", "CKPT"], "--registry writes to --out-dir DIR"),
    (["FILE", "--checkpoint", "CKPT", "--unverified"], "--unverified: only with --registry"),
    (["FILE", "--checkpoint", "CKPT", "-o", "g.png", "--out-dir", "out"], "not both"),
    (["--registry", "--out-dir", "out", "--checkpoint-for", "sd9=CKPT"], "is not BASE=CKPT"),
    ([], "say what to verify"),
])
def test_the_two_modes_do_not_mix(args, message, checkpoint, tmp_path, cli):
    lora = kohya_file(tiny_models.tiny_pipeline("sd1", 1), "sd1", tmp_path / "style.safetensors")
    args = [str(lora) if a == "FILE" else str(checkpoint) if a == "CKPT" else a for a in args]
    code, stdout, stderr = cli("verify", *args)
    assert code == 2 and stdout == ""
    assert message in stderr


def test_out_dir_names_grids_apart_and_escapes_names_in_the_contact_sheet(checkpoint, tmp_path, cli):
    pipe = tiny_models.tiny_pipeline("sd1", 1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    odd = kohya_file(pipe, "sd1", tmp_path / "a" / '<b>&"x" #1.safetensors')
    same_name = kohya_file(pipe, "sd1", tmp_path / "b" / '<b>&"x" #1.safetensors', std=0.2)
    out = tmp_path / "sheet"
    code, stdout, stderr = cli("verify", odd, same_name, "--checkpoint", checkpoint, "--out-dir", out, *FAST)
    assert code == 0, stderr
    grids = sorted(p.name for p in out.glob("*.png"))
    assert grids == sorted(f'<b>&"x" #1-{sha256(p)[:10]}.png' for p in (odd, same_name))
    page = (out / "index.html").read_text(encoding="utf-8")
    assert '<b>&"x"' not in page and "&lt;b&gt;&amp;&quot;x&quot;" in page
    sheet = sheet_of(out)
    assert [c["data-verdict"] for c in sheet.cards] == ["pass", "pass"]
    assert sheet.text.count('<b>&"x" #1.safetensors') == 2  # the name as the reader sees it
    assert "2 verified: 2 pass, 0 fail" in sheet.text
    assert f"contact sheet {out / 'index.html'}" in stdout
