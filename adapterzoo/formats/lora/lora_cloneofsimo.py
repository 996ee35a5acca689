"""The cloneofsimo `lora_diffusion` dialect: pairs numbered by injection order (fixtures/real/README.md).

Its injector walked `model.modules()`, kept modules whose class name is in the file's metadata list
and numbered their Linear children. The diffusers of that time registered a transformer block's
children as attn1, ff, attn2, so the numbering is rebuilt from that order, not today's.
"""

from __future__ import annotations

import json
import re

from adapterzoo.errors import BadFileError
from adapterzoo.formats.model.targets import Architecture, Target

ATTENTION_CLASSES = {"CrossAttention", "Attention"}
DEFAULT_CLASSES = {"unet": {"CrossAttention", "Attention", "GEGLU"}, "text_encoder": {"CLIPAttention"}}
KNOWN_CLASSES = {"unet": ATTENTION_CLASSES | {"GEGLU"}, "text_encoder": {"CLIPAttention"}}
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_CLIP_ATTENTION = ("k_proj", "v_proj", "q_proj", "out_proj")  # CLIPAttention's registration order
_BLOCK = re.compile(r"^(?P<block>.+\.transformer_blocks\.\d+)\.attn1\.to_q$")
_LAYER = re.compile(r"^(?P<layer>.+\.layers\.\d+)\.self_attn\.q_proj$")


def injected_classes(metadata: dict[str, str], component: str) -> set[str]:
    """Class names the file says were injected (the metadata keys `unet` / `text_encoder`)."""
    raw = metadata.get(component)
    if raw is None:
        return DEFAULT_CLASSES[component]
    try:
        classes = set(json.loads(raw))
    except (json.JSONDecodeError, TypeError):
        raise BadFileError(f"metadata {component!r} is not a JSON list of class names") from None
    unknown = classes - KNOWN_CLASSES[component]
    if unknown:
        raise BadFileError(f"cloneofsimo file injected {', '.join(sorted(unknown))} into the {component}; "
                           f"only {', '.join(sorted(KNOWN_CLASSES[component]))} are understood")
    return classes


def injection_order(architecture: Architecture, component: str, classes: set[str]) -> list[Target]:
    """The targets in the order the injector numbered them: index i of the file is entry i."""
    targets = architecture.targets
    order: list[str] = []
    if component == "unet":
        attention, geglu = bool(classes & ATTENTION_CLASSES), "GEGLU" in classes
        for path in targets:
            m = _BLOCK.match(path)
            if not (m and path.startswith("unet.")):
                continue
            block = m["block"]
            if attention:
                order += [f"{block}.attn1.{name}" for name in _ATTENTION]
            if geglu:
                order.append(f"{block}.ff.net.0.proj")
            if attention:
                order += [f"{block}.attn2.{name}" for name in _ATTENTION]
    else:
        for path in targets:
            m = _LAYER.match(path)
            if m and path.startswith(f"{component}."):
                order += [f"{m['layer']}.self_attn.{name}" for name in _CLIP_ATTENTION]
    return [targets[path] for path in order if path in targets]
