"""`adapterzoo serve` in a real Chromium (Debian's `chromium`, driven by Playwright): what a person does on the
page — filter, search, open a file and its grid, pull from the search page, verify — with no console errors,
a hostile file rendered inert and a cross-origin POST refused. One server and one browser for the module.

Screenshots of each page go to the module's temp folder; with ADAPTERZOO_SCREENSHOTS=DIR they are also
copied there (README's picture is made that way)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cli_helpers import run
from factory import small_lora
from fake_civitai import FakeCivitai
from safetensors.torch import load_file, save_file
from test_verify import kohya_file
from web_server import serving

from adapterzoo import tiny_models
from adapterzoo.sizes import human_size

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync"]
XSS_NAME = '<img src=x onerror=alert(1)>.safetensors'
FAST = ["--steps", "1", "--size", "64x64", "--multiplier", "0", "--multiplier", "1"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None

pytestmark = pytest.mark.skipif(sync_playwright is None or not CHROMIUM.is_file(),
                                reason="browser tests need playwright and Debian's chromium at /usr/bin/chromium "
                                       "(apt-get install chromium)")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict]:
    """A library (tiny SD1 checkpoint, a verified LoRA with its grid, one never verified, an SDXL LoRA, a
    hostile file) and the server on it."""
    root = tmp_path_factory.mktemp("site")
    models = root / "models"
    checkpoint = tiny_models.save_tiny_pipeline("sd1", models / "Stable-diffusion" / "tiny-sd1", seed=1)
    pipe = tiny_models.tiny_pipeline("sd1", 1)
    lora = models / "Lora"
    lora.mkdir(parents=True)
    style = kohya_file(pipe, "sd1", lora / "style.safetensors")
    kohya_file(pipe, "sd1", lora / "fresh.safetensors", std=0.2)
    save_file({k: v for k, v in load_file(small_lora(root / "x.safetensors")).items()}, str(lora / XSS_NAME),
              metadata={"ss_base_model_version": "sd_v1", "ss_output_name": "<script>alert(2)</script>",
                        "ss_tag_frequency": json.dumps({"1_x": {"<script>alert(3)</script>": 4,
                                                                "<img src=y onerror=alert(4)>": 2}})})
    import torch

    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(5120, 4)},
              str(lora / "xl-detail.safetensors"))
    preview(lora / "fresh.preview.png", ((32, 64, 160), (240, 120, 80)))
    preview(lora / "xl-detail.preview.png", ((20, 120, 90), (230, 220, 120)))
    db = root / "reg.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("ADAPTERZOO_HOME", str(root / "home"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["--db", str(db), "scan", str(models)], _Quiet(), mp)
    assert code == 0, err
    code, _, err = run(["--db", str(db), "verify", str(style), "--checkpoint", str(checkpoint), "--out-dir",
                        str(root / "grids"), *FAST], _Quiet(), mp)
    assert code == 0, err
    shots = root / "screens"
    shots.mkdir()
    with serving(db, library=root / "pulled") as url:
        yield {"url": url, "root": root, "shots": shots, "db": db}
    mp.undo()


class _Quiet:
    """capsys for a module fixture: run() reads what the command printed from here."""

    def readouterr(self) -> tuple[str, str]:
        return "", ""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, site) -> Iterator:
    """A fresh page; after the test, no console error and no uncaught exception may have happened on it."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    opened = context.new_page()
    problems: list[str] = []
    dialogs: list[str] = []
    opened.on("console", lambda m: problems.append(f"console {m.type}: {m.text} ({m.location['url']})")
              if m.type == "error" else None)
    opened.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    opened.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    opened.problems, opened.dialogs = problems, dialogs
    yield opened
    context.close()
    assert problems == []


def preview(path: Path, colours: tuple[tuple[int, int, int], tuple[int, int, int]]) -> None:
    """A made-up preview picture (a gradient and a few circles), so cards look like a real library's."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (384, 384))
    draw = ImageDraw.Draw(image)
    for y in range(384):
        t = y / 383
        draw.line([(0, y), (383, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(*colours)))
    for i, r in enumerate((90, 55, 30)):
        draw.ellipse([192 - r + i * 30, 170 - r, 192 + r + i * 30, 170 + r], outline=(255, 255, 255), width=4)
    image.save(path)


def wait_until(page, expression: str, arg=None, timeout: float = 30) -> None:
    """Poll `expression` (a JS function of `arg`) until it is true: page.wait_for_function evaluates its predicate
    with eval(), which the page's CSP (script-src 'self') refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression, arg):
        assert time.monotonic() < deadline, f"still false after {timeout} s: {expression}"
        time.sleep(0.05)


def shot(site: dict, page, name: str) -> None:
    wait_until(page, "() => [...document.images].every(i => i.complete)")
    path = site["shots"] / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("ADAPTERZOO_SCREENSHOTS"):
        target = Path(os.environ["ADAPTERZOO_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / f"serve-{name}.png")


def cards(page) -> list[str]:
    return page.locator(".card h2").all_inner_texts()


def test_library_filters_by_base_searches_text_and_opens_a_file_with_its_grid(site, page) -> None:
    page.goto(site["url"] + "/")
    assert sorted(cards(page)) == sorted(["fresh.safetensors", "style.safetensors", "tiny-sd1", XSS_NAME,
                                          "xl-detail.safetensors"])
    assert page.locator(".card", has_text="style.safetensors").locator(".verdict-pass").is_visible()
    shot(site, page, "library")

    page.select_option("select[name=base]", "sdxl")  # submits itself
    page.wait_for_url("**/?base=sdxl")
    assert cards(page) == ["xl-detail.safetensors"]
    page.click("text=clear")
    page.fill("input[name=q]", "STYLE")
    page.press("input[name=q]", "Enter")
    page.wait_for_url("**/?q=STYLE")
    assert cards(page) == ["style.safetensors"]
    page.click("text=☰ list")
    assert page.locator("table.files tbody tr").count() == 1
    shot(site, page, "list")

    page.click("table.files a:text('style.safetensors')")
    page.wait_for_url("**/files/*")
    grid = page.locator("img.grid").first
    grid.wait_for()
    assert page.evaluate("img => img.complete && img.naturalWidth > 0", grid.element_handle())
    assert page.locator(".verification .verdict-pass").count() == 1
    assert page.locator("img.heatmap").evaluate("img => img.complete && img.naturalWidth > 0")
    shot(site, page, "file")


def test_a_hostile_file_and_source_render_inert(site, page, fake_civitai: FakeCivitai) -> None:
    model = fake_civitai.add_model("<img src=z onerror=alert(5)>Evil", [site["root"] / "x.safetensors"])
    model.description = '<script>alert(6)</script><p onclick="alert(7)">Nice <b>LoRA</b></p>'
    for path in ("/?q=onerror", f"/files/{_id(site, XSS_NAME)}", "/search?q=evil&source=civitai"):
        page.goto(site["url"] + path)
        page.wait_for_load_state("networkidle")
        ours = page.evaluate("[...document.scripts].map(s => s.getAttribute('src'))")
        assert len(ours) == 1 and ours[0].startswith("/static/app.js")
        assert page.evaluate("document.querySelectorAll('[onerror], [onclick]').length") == 0
    assert "Nice LoRA" in page.inner_text(".hit .description")
    page.goto(site["url"] + f"/files/{_id(site, XSS_NAME)}")
    assert page.locator("h1").inner_text() == XSS_NAME
    assert "<script>alert(3)</script>" in page.locator("ol.tags").inner_text()
    assert page.dialogs == []


def test_a_pull_from_the_search_page_reaches_done_and_its_card_appears(site, page, fake_civitai: FakeCivitai) -> None:
    knight = small_lora(site["root"] / "src" / "knight.safetensors", seed=9)
    fake_civitai.add_model("Tiny Knight", [knight], trained_words=["kn1ght"])
    page.goto(site["url"] + "/search?q=knight&source=civitai")
    hit = page.locator(".hit", has_text="Tiny Knight")
    image = hit.locator("img").element_handle()
    wait_until(page, "img => img.complete", image)  # loaded or failed: on a busy machine not yet when the page is
    assert image.evaluate("img => img.naturalWidth > 0")
    hit.locator("button.pull").click()
    status = hit.locator(".job-status")
    wait_until(page, "s => s.dataset.state === 'done'", status.element_handle(), timeout=60)
    assert "pulled: knight.safetensors" in status.inner_text()
    shot(site, page, "search")

    page.goto(site["url"] + "/jobs")
    assert page.locator(".job.state-done", has_text="civitai:").count() >= 1
    shot(site, page, "jobs")
    page.goto(site["url"] + "/?q=knight")
    assert cards(page) == ["Tiny Knight"]
    assert (site["root"] / "pulled" / "models" / "Lora" / "knight.safetensors").is_file()


def test_a_verify_started_on_the_file_page_lands_its_verdict(site, page) -> None:
    page.goto(site["url"] + f"/files/{_id(site, 'fresh.safetensors')}")
    assert page.locator(".verification").count() == 0
    page.fill("form.verify input[name=steps]", "1")
    page.fill("form.verify input[name=size]", "64x64")
    page.click("form.verify button")
    page.locator(".verification").first.wait_for(timeout=120_000)
    assert page.locator(".verification .verdict-pass").count() == 1
    assert page.locator("img.grid").evaluate("img => img.complete && img.naturalWidth > 0")


def test_a_page_on_another_origin_cannot_start_a_job(site, page, fake_civitai: FakeCivitai) -> None:
    before = len(requests.get(site["url"] + "/api/jobs", timeout=10).json())
    page.goto(fake_civitai.url + "/images/1/x.png")  # any page of another origin (another port)
    page.wait_for_load_state("networkidle")  # its favicon request (a 404 there) lands before the clear below
    sent = page.evaluate("""url => fetch(url + '/api/jobs', {method: 'POST', mode: 'no-cors', credentials: 'include',
                              headers: {'Content-Type': 'text/plain'}, body: '{"action": "scan", "paths": ["/"]}'})
                              .then(() => 'answered', () => 'blocked')""", site["url"])
    assert sent == "blocked"  # our 403 carries Cross-Origin-Resource-Policy: same-origin, so not even that is seen
    assert len(requests.get(site["url"] + "/api/jobs", timeout=10).json()) == before
    page.problems.clear()  # the other page's console reports the refusal


def test_the_other_pages_open_without_errors(site, page) -> None:
    for path, name in (("/jobs", None), ("/dupes", "dupes"), ("/updates", None), ("/disk", None),
                       ("/docs", "docs")):
        page.goto(site["url"] + path)
        page.wait_for_load_state("networkidle")
        assert page.locator("main").inner_text().strip()
        if name:
            shot(site, page, name)
    assert page.goto(site["url"] + "/files/999").status == 404
    assert page.locator("main").inner_text().strip().startswith("No registry entry 999.")
    assert [p.split(" (")[-1] for p in page.problems] == [f"{site['url']}/files/999)"]  # the 404 itself
    page.problems.clear()


def _id(site: dict, name: str) -> int:
    rows = requests.get(site["url"] + "/api/files", params={"per_page": 500}, timeout=10).json()
    return next(r["id"] for r in rows if r["name"] == name)


def test_duplicates_updates_and_disk_use_pages(site, page, fake_civitai: FakeCivitai, capsys, monkeypatch) -> None:
    copies = site["root"] / "copies"
    copies.mkdir()
    shutil.copyfile(site["root"] / "models" / "Lora" / "fresh.safetensors", copies / "fresh.safetensors")
    castle = fake_civitai.add_model("Tiny Castle", [small_lora(site["root"] / "src" / "castle.safetensors", seed=11)])
    db = ["--db", str(site["db"])]
    assert run([*db, "scan", str(copies)], capsys, monkeypatch)[0] == 0
    code, _, err = run([*db, "pull", f"civitai:{castle.versions[0].id}", "--library", str(site["root"] / "pulled")],
                       capsys, monkeypatch)
    assert code == 0, err
    newer = fake_civitai.add_version(castle, [small_lora(site["root"] / "src" / "castle_v2.safetensors", seed=12)],
                                     "SD 1.5", [], name="v2.0")

    page.goto(site["url"] + "/dupes")
    group = page.locator("section.group", has_text=str(copies / "fresh.safetensors"))
    freed = human_size((copies / "fresh.safetensors").stat().st_size)
    assert group.locator("tr").count() == 2 and f"{freed} to free" in group.locator("h2").inner_text()
    page.goto(site["url"] + "/disk?by=kind")
    bars = page.locator("svg.bars rect")
    assert bars.count() >= 2
    widths = [bar.evaluate("b => b.getBoundingClientRect().width") for bar in bars.all()]
    assert max(widths) > 0 and widths == sorted(widths, reverse=True)  # largest first, scaled to it
    shot(site, page, "disk")

    page.goto(site["url"] + "/updates?check=1")
    row = page.locator("tr.update", has_text="Tiny Castle")
    assert "v2.0" in row.inner_text()
    shot(site, page, "updates")
    page.goto(site["url"] + "/?update=available")
    assert "Tiny Castle" in cards(page)  # (each test's fake Civitai numbers its models from 101 again)
    assert page.locator(".card", has_text="Tiny Castle").locator(".badge.update").is_visible()
    page.goto(site["url"] + "/updates")
    row.locator("button.pull").click()
    status = row.locator(".job-status")
    wait_until(page, "s => s.dataset.state === 'done'", status.element_handle(), timeout=60)
    assert "pulled: castle_v2.safetensors" in status.inner_text()
    assert newer.id in [s["civitai_version_id"] for r in requests.get(
        site["url"] + "/api/files", params={"q": "castle_v2"}, timeout=10).json()
        for s in requests.get(f"{site['url']}/api/files/{r['id']}", timeout=10).json()["sources"]]


