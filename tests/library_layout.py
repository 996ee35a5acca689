"""A library laid out like A1111 and ComfyUI side by side, the same LoRA in both, for the library-care tests;
and the CLI runner they share (in-process, as `adapterzoo ARGS...`, with ADAPTERZOO_HOST chosen per call)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from cli_helpers import run
from safetensors.torch import save_file
from sqlalchemy import create_engine, inspect, text

from adapterzoo.zoo.models import name_key

LORA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def lora(path: Path, seed: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """A one-module SD1 kohya LoRA (about 13 KB); the same seed and metadata give the same bytes."""
    gen = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{LORA_KEY}.lora_down.weight": torch.randn(4, 768, generator=gen),
               f"{LORA_KEY}.lora_up.weight": torch.randn(320, 4, generator=gen),
               f"{LORA_KEY}.alpha": torch.tensor(4.0)}, str(path), metadata=metadata)
    return path


def embedding(path: Path, seed: int = 0) -> Path:
    """A kohya-style SD1 embedding of two vectors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.randn(2, 768, generator=torch.Generator().manual_seed(seed))}, str(path))
    return path


def side_by_side(root: Path) -> dict[str, Path]:
    """stable-diffusion-webui/ and ComfyUI/ under `root`:
    - style: one LoRA in both UIs' LoRA folders (same bytes), with a .civitai.info, .json and preview in A1111;
    - retagged: the same tensors as style with other metadata, in ComfyUI (an AutoV3 twin);
    - comfy_only: a LoRA only ComfyUI has; twin_name: another file named like it, in A1111;
    - badhands: an embedding in A1111."""
    a1111, comfy = root / "stable-diffusion-webui", root / "ComfyUI"
    files = {"a1111": a1111, "comfyui": comfy, "root": root}
    files["style"] = lora(a1111 / "models" / "Lora" / "style.safetensors", metadata={"ss_output_name": "style"})
    stem = files["style"].with_suffix("")
    stem.with_name("style.civitai.info").write_text(json.dumps({"id": 7, "trainedWords": ["inkwash"]}))
    stem.with_name("style.json").write_text(json.dumps({"activation text": "ink painting"}))
    stem.with_name("style.preview.png").write_bytes(b"\x89PNG\r\n\x1a\npreview")
    files["style_copy"] = comfy / "models" / "loras" / "style.safetensors"
    files["style_copy"].parent.mkdir(parents=True)
    files["style_copy"].write_bytes(files["style"].read_bytes())
    files["retagged"] = lora(comfy / "models" / "loras" / "style-retagged.safetensors",
                             metadata={"ss_output_name": "style", "modelspec.title": "Style, retagged"})
    files["comfy_only"] = lora(comfy / "models" / "loras" / "castle.safetensors", seed=1)
    files["twin_name"] = lora(a1111 / "models" / "Lora" / "castle.safetensors", seed=2)
    files["badhands"] = embedding(a1111 / "embeddings" / "badhands.safetensors")
    (a1111 / "webui-user.sh").write_text('#!/bin/bash\nexport COMMANDLINE_ARGS="--xformers"\n')
    (comfy / "comfy").mkdir()
    return files


class Cli:
    """`adapterzoo ARGS...` in-process; `host` sets ADAPTERZOO_HOST for the call."""

    def __init__(self, capsys: Any, monkeypatch: Any) -> None:
        self.capsys, self.monkeypatch = capsys, monkeypatch

    def __call__(self, *args: Any, host: str = "a") -> tuple[int, str, str]:
        self.monkeypatch.setenv("ADAPTERZOO_HOST", host)
        answer = run([str(a) for a in args], self.capsys, self.monkeypatch)
        words = [str(a) for a in args]
        url = words[words.index("--db") + 1] if "--db" in words else None
        assert stale_name_keys(url) == [], f"after adapterzoo {' '.join(words)}"
        return answer

    def json(self, *args: Any, host: str = "a") -> Any:
        code, out, err = self(*args, "--json", host=host)
        assert code == 0, err
        return json.loads(out)


def stale_name_keys(option: str | None = None) -> list[tuple[str, str | None]]:
    """(path, name_key) of every location whose name_key is not models.name_key(path), in the registry that
    `--db option` names (else ADAPTERZOO_DB, else the home's); none where that registry does not exist. Every
    command that writes a location's path must write its name_key too: Cli checks this after each command."""
    value = option or os.environ.get("ADAPTERZOO_DB") or str(Path(os.environ["ADAPTERZOO_HOME"]) / "registry.db")
    if "://" not in value:
        if not Path(value).is_file():
            return []
        value = f"sqlite:///{Path(value).absolute()}"
    engine = create_engine(value)
    try:
        if not inspect(engine).has_table("locations"):
            return []
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT path, name_key FROM locations")).all()
    finally:
        engine.dispose()
    return [(path, key) for path, key in rows if key != name_key(path)]


def locations(entry: dict[str, Any], host: str | None = None) -> dict[str, bool]:
    """path -> missing, of an entry's locations (on one host)."""
    return {loc["path"]: loc["missing"] for loc in entry["locations"] if host is None or loc["host"] == host}


def same_inode(a: Path, b: Path) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_dev == os.stat(b).st_dev
