"""Where pulled files go in A1111 and ComfyUI libraries, and the sidecars their Civitai extensions read."""

from __future__ import annotations

import io
import json
from pathlib import Path

import factory
import pytest
from PIL import Image

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.probe import probe
from adapterzoo.zoo.hashing import sha256_of
from adapterzoo.zoo.library import INCOMING, choose_kind, library_folder, settle, write_sidecars

WHERE = {  # case -> (A1111 folder, ComfyUI folder)
    "kohya-sd1": ("models/Lora", "models/loras"),
    "lycoris-loha": ("models/Lora", "models/loras"),
    "ckpt-sd1-ldm": ("models/Stable-diffusion", "models/checkpoints"),
    "unet-only-sdxl-bare": ("models/Stable-diffusion", "models/unet"),
    "vae-ldm": ("models/VAE", "models/vae"),
    "embedding-a1111-sd1": ("embeddings", "models/embeddings"),
    "hypernetwork-a1111": ("models/hypernetworks", "models/hypernetworks"),
}


NO_CLASH = "f" * 64  # the digest only names a file that must go beside another: none does here


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each case built once (checkpoints are sparse gigabytes: linked into each test, never copied)."""
    root = tmp_path_factory.mktemp("library-cases")
    return {case: factory.build(case, root).path for case in [*WHERE, "unknown-safetensors"]}


@pytest.fixture
def incoming(tmp_path: Path, built: dict[str, Path]):
    """A library, and a case's file as if just downloaded into its incoming folder."""
    def link(case: str) -> tuple[Path, Path]:
        library = tmp_path / "library"
        folder = library / INCOMING
        folder.mkdir(parents=True)
        path = folder / built[case].name
        path.hardlink_to(built[case])
        return library, path

    return link


@pytest.mark.parametrize("layout", ["a1111", "comfyui"])
@pytest.mark.parametrize("case", list(WHERE))
def test_a_file_the_source_says_nothing_about_goes_where_its_kind_belongs(
    incoming, built: dict[str, Path], case: str, layout: str
) -> None:
    library, path = incoming(case)
    placed = settle(path, library, layout, None, probe(path), NO_CLASH)
    assert placed.path == library / WHERE[case][layout == "comfyui"] / path.name
    assert placed.moved and placed.note is None and placed.path.samefile(built[case])
    assert not path.exists()


def test_the_probe_overrules_a_source_that_calls_a_vae_a_checkpoint(incoming) -> None:
    library, path = incoming("vae-ldm")
    placed = settle(path, library, "a1111", "checkpoint", probe(path), NO_CLASH)
    assert placed.path.parent == library / "models/VAE" and placed.kind == "vae"
    assert placed.note == "the source says checkpoint but the file is a vae"


def test_lora_and_lycoris_are_one_folder_and_no_disagreement(incoming) -> None:
    library, path = incoming("lycoris-loha")
    assert choose_kind("lora", probe(path)) == ("lycoris", None)


def test_the_sources_kind_stands_when_the_probe_cannot_tell(incoming) -> None:
    library, path = incoming("unknown-safetensors")
    placed = settle(path, library, "comfyui", "embedding", probe(path), NO_CLASH)
    assert placed.path.parent == library / "models/embeddings" and placed.note is None


def test_a_file_nobody_can_name_is_refused_and_stays(incoming) -> None:
    library, path = incoming("unknown-safetensors")
    with pytest.raises(AdapterzooError, match=r"cannot tell what classifier\.safetensors is .* it stays at "):
        settle(path, library, "a1111", None, probe(path), NO_CLASH)
    assert path.is_file()


def test_a_different_file_in_the_kind_folder_is_kept_and_ours_goes_beside_it(incoming) -> None:
    library, path = incoming("kohya-sd1")
    theirs = library / "models/Lora" / path.name
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"someone else's lora")
    digest = sha256_of(path)
    placed = settle(path, library, "a1111", "lora", probe(path), digest)
    assert theirs.read_bytes() == b"someone else's lora" and placed.beside == theirs
    assert placed.path == theirs.with_name(f"kohya_sd1.{digest[:10]}.safetensors")


def test_a_file_already_in_its_folder_stays_put(tmp_path: Path, built: dict[str, Path]) -> None:
    library = tmp_path / "library"
    folder = library_folder(library, "lora", "a1111")
    folder.mkdir(parents=True)
    path = folder / "x.safetensors"
    path.hardlink_to(built["kohya-sd1"])
    placed = settle(path, library, "a1111", "lora", probe(path), NO_CLASH)
    assert placed.path == path and not placed.moved


def test_an_unknown_layout_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(AdapterzooError, match="unknown library layout 'invoke'; choose one of a1111, comfyui"):
        library_folder(tmp_path, "lora", "invoke")


VERSION = {"id": 128713, "modelId": 4201, "name": "v1.0", "baseModel": "SD 1.5", "trainedWords": ["ohwx", "café"],
           "model": {"name": "Realistic Thing", "type": "LORA", "nsfw": False}}


def picture(fmt: str) -> bytes:
    image = Image.new("RGB", (48, 32))
    for x in range(48):
        for y in range(32):
            image.putpixel((x, y), (x * 5, y * 8, 128))
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}))
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_sidecars_are_what_a1111_extensions_read(tmp_path: Path, fmt: str) -> None:
    model = tmp_path / "Lora" / "thing.safetensors"
    model.parent.mkdir()
    model.write_bytes(b"model")
    written = write_sidecars(model, VERSION, picture(fmt))

    info, preview = tmp_path / "Lora/thing.civitai.info", tmp_path / "Lora/thing.preview.png"
    assert written == [info, preview]
    assert json.loads(info.read_text(encoding="utf-8")) == VERSION
    with Image.open(preview) as got:
        assert got.format == "PNG" and got.size == (48, 32)
        r, g, b = got.convert("RGB").getpixel((40, 30))
        assert abs(r - 200) <= 6 and abs(g - 240) <= 6 and abs(b - 128) <= 6  # JPEG is lossy by a few levels
    if fmt == "PNG":
        assert preview.read_bytes() == picture("PNG")
    assert sorted(p.name for p in model.parent.iterdir()) == ["thing.civitai.info", "thing.preview.png",
                                                              "thing.safetensors"]


def test_existing_sidecars_are_the_users_and_stay(tmp_path: Path) -> None:
    model = tmp_path / "thing.safetensors"
    model.write_bytes(b"model")
    (tmp_path / "thing.civitai.info").write_text("{}")
    (tmp_path / "thing.preview.png").write_bytes(b"mine")
    assert write_sidecars(model, VERSION, picture("PNG")) == []
    assert (tmp_path / "thing.civitai.info").read_text() == "{}"
    assert (tmp_path / "thing.preview.png").read_bytes() == b"mine"


def test_a_preview_that_is_not_an_image_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    model = tmp_path / "thing.safetensors"
    model.write_bytes(b"model")
    with pytest.raises(AdapterzooError, match="the preview is not an image PIL can read"):
        write_sidecars(model, None, b"\x00\x00\x00\x18ftypmp42 a video")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing.safetensors"]
