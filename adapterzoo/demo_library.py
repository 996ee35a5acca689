"""A small model library of every kind, built offline from the tiny models, for `adapterzoo demo`.

Laid out the way A1111 users keep theirs, with one broken and one dangerous file among them so the
tour shows what a scan says about those too, and a LoRA whose every up factor is zero (what a training
run saved before its first step) that loads fine and does nothing, which only `verify` catches.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()  # the tour's output is the tour, not library chatter
transformers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()

from adapterzoo import tiny_models

LORA_RANK, LORA_ALPHA = 4, 2.0


def _kohya_lora(pipeline, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    """Rank-`rank` factors on every attention projection, named as kohya flattens module paths."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    targets = [("lora_unet", pipeline.unet, ("to_q", "to_k", "to_v", "to_out.0")),
               ("lora_te_text_model", pipeline.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"))]
    for prefix, model, leaves in targets:
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith(leaves):
                name = f"{prefix}_{path.replace('.', '_')}"
                down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
                tensors[f"{name}.lora_down.weight"] = down.half()
                tensors[f"{name}.lora_up.weight"] = (torch.randn(module.out_features, rank, generator=generator)).half()
                tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def _hypernetwork(widths: list[int]) -> dict:
    """A1111's layout (FORMATS.md §3): per width a (k, v) pair of Sequential state dicts, [1, 2, 1]."""
    layers = {}
    for width in widths:
        layers[width] = tuple(
            {"linear.0.weight": torch.randn(2 * width, width) * 0.01, "linear.0.bias": torch.zeros(2 * width),
             "linear.2.weight": torch.randn(width, 2 * width) * 0.01, "linear.2.bias": torch.zeros(width)}
            for _ in range(2)
        )
    return {**layers, "step": 100, "name": "tiny-hypernetwork", "layer_structure": [1, 2, 1],
            "activation_func": "relu", "is_layer_norm": False, "weight_initialization": "Normal",
            "use_dropout": False, "activate_output": False, "sd_checkpoint": None, "sd_checkpoint_name": None}


class _RunsCode:
    """Pickles to a call of `print`: harmless, but no weights-only loader will run it."""

    def __reduce__(self):
        return (print, ("this would have run",))


def build_library(root: Path) -> Path:
    """Write the demo library under `root` and return the models folder to scan."""
    models = root / "models"
    for sub in ("Stable-diffusion", "Lora", "hypernetworks", "embeddings"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    pipeline = tiny_models.tiny_pipeline("sd1", seed=0)
    pipeline.save_pretrained(models / "Stable-diffusion" / "tiny-sd1", safe_serialization=True)

    lora = _kohya_lora(pipeline, LORA_RANK, LORA_ALPHA, seed=1)
    lora_path = models / "Lora" / "tiny-sd1-style.safetensors"
    save_file(lora, lora_path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(LORA_RANK),
                                         "ss_network_alpha": str(LORA_ALPHA), "ss_base_model_version": "sd_v1",
                                         "ss_tag_frequency": '{"10_style": {"tinystyle": 12, "painting": 5}}'})
    zero = {k: torch.zeros_like(v) if ".lora_up." in k else v for k, v in lora.items()}  # trained for 0 steps
    save_file(zero, models / "Lora" / "tiny-sd1-untrained.safetensors",
              metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    data = lora_path.read_bytes()
    (models / "Lora" / "half-downloaded.safetensors").write_bytes(data[: len(data) // 2])

    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 768) * 0.01},
                "name": "tiny-token", "step": 500, "sd_checkpoint": None, "sd_checkpoint_name": None},
               models / "embeddings" / "tiny-token.pt")
    torch.save(_hypernetwork([768, 32, 64]), models / "hypernetworks" / "tiny-hypernetwork.pt")
    with open(models / "Stable-diffusion" / "needs-code.ckpt", "wb") as fh:
        pickle.dump({"state_dict": _RunsCode()}, fh)
    return models
