"""Read the model folders a UI is configured with, as roots: ComfyUI's extra_model_paths.yaml (every section,
each with its base_path), A1111/Forge's --ckpt-dir, --lora-dir, ... from webui-user.sh/.bat or a command line,
and InvokeAI's invokeai.yaml models_dir. Paths are resolved the way each UI resolves them."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.roots import guess_layout

COMFYUI_CONFIG = "extra_model_paths.yaml"
A1111_CONFIGS = ("webui-user.sh", "webui-user.bat")
INVOKEAI_CONFIG = "invokeai.yaml"
# ComfyUI folder names -> our kinds; names not here hold models we index as they come (upscalers, encoders).
COMFYUI_KINDS = {"checkpoints": "checkpoint", "diffusion_models": "checkpoint", "unet": "checkpoint",
                 "loras": "lora", "vae": "vae", "embeddings": "embedding", "hypernetworks": "hypernetwork",
                 "controlnet": "controlnet", "t2i_adapter": "controlnet"}
COMFYUI_NOT_MODELS = {"base_path", "is_default", "configs", "custom_nodes", "download_model_base"}
A1111_DIRS = {"--ckpt-dir": "checkpoint", "--lora-dir": "lora", "--lyco-dir": "lycoris",
              "--embeddings-dir": "embedding", "--hypernetwork-dir": "hypernetwork", "--vae-dir": "vae",
              "--controlnet-dir": "controlnet"}


@dataclass(frozen=True)
class RootSpec:
    """A folder to add as a root: which UI's it is, the one kind it holds (None: a whole install), and why."""

    path: str
    layout: str
    kind: str | None
    label: str


def read_config(path: Path) -> list[RootSpec]:
    """The roots a UI config file names; a UI folder: those of the config files in it, and a ComfyUI install's
    own models folder."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        found = [path / name for name in (COMFYUI_CONFIG, *A1111_CONFIGS, INVOKEAI_CONFIG) if (path / name).is_file()]
        comfyui = guess_layout(path) == "comfyui" and (path / "models").is_dir()
        if not found and not comfyui:
            raise AdapterzooError(f"{path} holds none of {COMFYUI_CONFIG}, {', '.join(A1111_CONFIGS)}, "
                                  f"{INVOKEAI_CONFIG}: give the file, or add the folder with `roots add`")
        own = [RootSpec(str(path / "models"), "comfyui", None, "ComfyUI models")] if comfyui else []
        return own + [spec for file in found for spec in read_config(file)]
    if path.name in A1111_CONFIGS:
        return a1111_roots(a1111_arguments(path), path.parent, posix=path.suffix != ".bat")
    if path.name == INVOKEAI_CONFIG:
        return invokeai_roots(path)
    if path.suffix in (".yaml", ".yml"):
        return comfyui_roots(path)
    raise AdapterzooError(f"{path.name}: not a UI config adapterzoo reads ({COMFYUI_CONFIG}, "
                          f"{', '.join(A1111_CONFIGS)}, {INVOKEAI_CONFIG})")


def comfyui_roots(path: Path) -> list[RootSpec]:
    """Every folder of every section; base_path (env vars, ~) is relative to the YAML's folder, and so is a
    folder of a section without one, as ComfyUI resolves them."""
    config = _yaml(path)
    here = path.parent
    specs = []
    for section, body in config.items():
        if not isinstance(body, dict):
            continue
        base = body.get("base_path")
        base = _expand(str(base), here) if base else None
        for key, value in body.items():
            if key in COMFYUI_NOT_MODELS or not isinstance(value, str):
                continue
            for line in (line.strip() for line in value.splitlines()):
                if line:
                    folder = _expand(line, Path(base) if base else here)
                    specs.append(RootSpec(folder, "comfyui", COMFYUI_KINDS.get(key), f"{path.name} {section} {key}"))
    return specs


def a1111_arguments(path: Path) -> str:
    """COMMANDLINE_ARGS from webui-user.sh (`export COMMANDLINE_ARGS="..."`) or .bat (`set COMMANDLINE_ARGS=...`);
    the last assignment wins, as in the shell."""
    value = ""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = re.match(r"\s*(?:export\s+|set\s+)?COMMANDLINE_ARGS\s*=\s*(.*?)\s*$", line, re.IGNORECASE)
        if match:
            value = match.group(1)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
    return value


def a1111_roots(arguments: str, install: Path | None, posix: bool = os.name != "nt") -> list[RootSpec]:
    """The install (or its --data-dir) as an A1111 root, and each --*-dir as that kind's root. Relative folders
    are the install's (A1111 runs from there), else the current folder's. `posix`: shell quoting (a .bat file's
    backslashes are path separators, not escapes)."""
    try:
        words = shlex.split(arguments, posix=posix)
    except ValueError as exc:
        raise AdapterzooError(f"cannot read the A1111 command line {arguments!r}: {exc}") from None
    base = install or Path.cwd()
    given: dict[str, str] = {}
    for index, word in enumerate(words):
        flag, sep, value = word.partition("=")
        if flag in (*A1111_DIRS, "--data-dir"):
            value = value if sep else (words[index + 1] if index + 1 < len(words) else "")
            if value:
                given[flag] = _expand(value.strip("\"'"), base)
    specs = []
    data = given.pop("--data-dir", None) or (str(install) if install else None)
    if data:
        specs.append(RootSpec(data, "a1111", None, "A1111 data folder" if install is None or data != str(install)
                              else "A1111 install"))
    specs += [RootSpec(folder, "a1111", A1111_DIRS[flag], flag) for flag, folder in given.items()]
    return specs


def invokeai_roots(path: Path) -> list[RootSpec]:
    """models_dir (InvokeAI 4 at the top, InvokeAI 3 under InvokeAI: Paths:), relative to the root folder that
    holds invokeai.yaml; `models` when unset."""
    config = _yaml(path)
    legacy = ((config.get("InvokeAI") or {}).get("Paths") or {}) if isinstance(config.get("InvokeAI"), dict) else {}
    models = config.get("models_dir") or legacy.get("models_dir") or "models"
    return [RootSpec(_expand(str(models), path.parent), "invoke", None, f"{path.name} models_dir")]


def _expand(value: str, relative_to: Path) -> str:
    folder = Path(os.path.expandvars(os.path.expanduser(value)))
    return os.path.normpath(folder if folder.is_absolute() else relative_to / folder)


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AdapterzooError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise AdapterzooError(f"{path} is not valid YAML{line}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise AdapterzooError(f"{path} is not a YAML mapping of sections")
    return config
