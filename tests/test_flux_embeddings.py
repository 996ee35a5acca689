"""T5 (`t5xxl`) embeddings, as published for Flux and SD3: probe names the encoder slots and the base, and
conversion to formats without a T5 slot is refused with the reason instead of writing 4096-wide vectors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.convert import convert
from adapterzoo.formats.probe import probe


@pytest.mark.parametrize("slots,base", [({"t5xxl": 4096}, "flux"), ({"clip_l": 768, "t5xxl": 4096}, "flux"),
                                        ({"clip_l": 768, "clip_g": 1280, "t5xxl": 4096}, "sd3")])
def test_t5_embedding_is_an_encoder_slot(tmp_path, slots, base):
    path = tmp_path / "negative.safetensors"
    save_file({slot: torch.randn(78, width) for slot, width in slots.items()}, str(path))
    found = probe(path)
    assert (found.kind, found.base, found.details["vectors"], found.details["slots"]) == ("embedding", base, 78, slots)
    for to in ("a1111", "kohya", "diffusers"):
        out = tmp_path / f"out.{'pt' if to == 'a1111' else 'safetensors'}"
        with pytest.raises(AdapterzooError, match="no T5 slot"):
            convert(path, out, to)
        assert not out.exists()
