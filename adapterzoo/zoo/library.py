"""Where a pulled file goes in an A1111 or ComfyUI library, and the sidecars those UIs read.

The kind decides the folder. The source's word for the kind comes first, but the file's bytes have
the last say: Civitai lists VAEs as checkpoints and LyCORIS as LoRA, and a plain URL says nothing.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.atomic import atomic_output
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.zoo.download import place_file
from adapterzoo.zoo.triggers import CIVITAI_SIDECAR, sidecar_stem

LAYOUTS: dict[str, dict[str, str]] = {
    "a1111": {
        "checkpoint": "models/Stable-diffusion", "diffusion_model": "models/Stable-diffusion",
        "lora": "models/Lora", "lycoris": "models/Lora", "embedding": "embeddings",
        "hypernetwork": "models/hypernetworks", "vae": "models/VAE", "controlnet": "models/ControlNet",
    },
    "comfyui": {
        "checkpoint": "models/checkpoints", "diffusion_model": "models/unet",
        "lora": "models/loras", "lycoris": "models/loras", "embedding": "models/embeddings",
        "hypernetwork": "models/hypernetworks", "vae": "models/vae", "controlnet": "models/controlnet",
    },
}
INCOMING = ".incoming"  # a download whose kind nobody knows yet waits here; scans skip dot folders
PREVIEW_SIDECAR = ".preview.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DENOISERS = {"unet", "transformer"}  # a checkpoint holding only these is a bare diffusion model


@dataclass(frozen=True)
class Placed:
    """Where a file settled. `note` says when the source's kind and the probed one disagreed."""

    path: Path
    kind: str
    moved: bool
    reused: bool = False
    beside: Path | None = None
    note: str | None = None


def choose_kind(stated: str | None, probed: ProbeResult | None) -> tuple[str, str | None]:
    """The kind to file under, and a note when the source said otherwise. The probe wins when it
    recognised the file; the source's word stands when the probe could not tell (or failed)."""
    found = probed.kind if probed is not None else "unknown"
    stated = stated if stated and stated != "unknown" else None
    if found == "unknown":
        return stated or "unknown", None
    if stated and stated != found and {stated, found} != {"lora", "lycoris"}:
        return found, f"the source says {stated} but the file is a {found}"
    return found, None


def library_folder(library: str | Path, kind: str, layout: str = "a1111", probed: ProbeResult | None = None) -> Path:
    """The folder of `library` where the UI of `layout` looks for files of `kind`; for a kind not yet
    known, the incoming folder. A checkpoint that is only a UNet/transformer is a diffusion model
    (ComfyUI's `models/unet`)."""
    try:
        folders = LAYOUTS[layout]
    except KeyError:
        raise AdapterzooError(f"unknown library layout {layout!r}; choose one of {', '.join(LAYOUTS)}") from None
    if kind == "unknown":
        return Path(library) / INCOMING
    components = set(probed.details.get("components") or ()) if probed is not None else set()
    if kind == "checkpoint" and components and components <= DENOISERS:
        kind = "diffusion_model"
    if kind not in folders:
        raise AdapterzooError(f"a {kind} has no folder in a {layout} library")
    return Path(library) / folders[kind]


def settle(
    path: Path, library: str | Path, layout: str, stated_kind: str | None, probed: ProbeResult | None, sha256: str
) -> Placed:
    """Move a downloaded file to its kind's folder (if it is not there already), never over another file.
    A file neither the source nor the probe can name is refused and stays where it is."""
    kind, note = choose_kind(stated_kind, probed)
    if kind == "unknown":
        raise AdapterzooError(f"cannot tell what {path.name} is (the source gives no kind and probing found none), "
                              f"so it has no place in a {layout} library; it stays at {path}")
    folder = library_folder(library, kind, layout, probed)
    if path.parent == folder:
        return Placed(path, kind, moved=False, note=note)
    folder.mkdir(parents=True, exist_ok=True)
    target, reused, beside = place_file(path, folder / path.name, sha256)
    return Placed(target, kind, moved=True, reused=reused, beside=beside, note=note)


def write_sidecars(model: Path, version: dict[str, Any] | None = None, preview: bytes | None = None) -> list[Path]:
    """Write `<name>.civitai.info` (the version JSON as the source gave it) and `<name>.preview.png`
    beside `model`, as A1111's Civitai extensions do, so A1111 and ComfyUI show them. A sidecar that
    already exists is the user's and is left alone. Returns the files written."""
    stem = sidecar_stem(model, model.is_dir())
    written = []
    if version is not None:
        info = stem.with_name(stem.name + CIVITAI_SIDECAR)
        if not info.exists():
            with atomic_output(info) as tmp:
                tmp.write_text(json.dumps(version, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(info)
    if preview is not None:
        image = stem.with_name(stem.name + PREVIEW_SIDECAR)
        if not image.exists():
            png = _as_png(preview)
            with atomic_output(image) as tmp:
                tmp.write_bytes(png)
            written.append(image)
    return written


def _as_png(data: bytes) -> bytes:
    """PNG bytes as they are; JPEG, WebP and other stills converted with PIL (A1111 reads `.preview.png`)."""
    if data.startswith(PNG_MAGIC):
        return data
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            converted = picture if picture.mode in ("RGB", "RGBA", "L", "LA", "P") else picture.convert("RGB")
            out = io.BytesIO()
            converted.save(out, format="PNG")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise AdapterzooError(f"the preview is not an image PIL can read ({exc.__class__.__name__}); "
                              f"no preview was written") from None
    return out.getvalue()
