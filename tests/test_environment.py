"""The suite's references (diffusers' and PEFT's own loaders) work with what pip installed.

When a new release of one of them breaks the others, this test names the combination in one line,
instead of the break surfacing as dozens of unrelated failures further down.
"""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch
from peft import LoraConfig

from adapterzoo import tiny_models

STACK = ("diffusers", "transformers", "peft", "torch")


def installed() -> str:
    return ", ".join(f"{name} {version(name)}" for name in STACK)


def test_the_installed_stack_can_load_a_lora_into_a_text_encoder():
    pipe = tiny_models.tiny_pipeline("sd1", seed=0)
    encoder = pipe.text_encoder
    ids = torch.tensor([[0, 5, 7, 1]])
    before = encoder(ids).last_hidden_state
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    try:
        encoder.add_adapter(config)
        error = None
    except Exception as caught:  # noqa: BLE001 - any failure here is the incompatibility we name
        error = caught
    if error is not None:
        pytest.fail(f"{installed()} cannot load a LoRA into a text encoder ({error}); "
                    "bound the newest of them in pyproject.toml", pytrace=False)
    after = encoder(ids).last_hidden_state
    assert not torch.equal(before, after), f"{installed()}: the LoRA loaded but changed nothing"
