"""Hypernetworks: A1111 .pt -> safetensors -> A1111 .pt with every tensor and structure field unchanged."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.hypernetwork_convert import convert_hypernetwork
from adapterzoo.formats.probe import probe

# The fields A1111's Hypernetwork.load reads (and its saver writes).
A1111_READS = ("layer_structure", "activation_func", "weight_initialization", "is_layer_norm", "use_dropout",
               "activate_output", "dropout_structure", "last_layer_dropout", "name", "step", "sd_checkpoint",
               "sd_checkpoint_name", "optional_info")
ACTIVATIONS = {"relu": torch.nn.ReLU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh}


def a1111_module(dim: int, fields: dict) -> torch.nn.Sequential:
    """The Sequential A1111's HypernetworkModule builds: Linear, activation, LayerNorm, Dropout per step."""
    layers, dropout = fields["layer_structure"], fields["dropout_structure"]
    modules: list[torch.nn.Module] = []
    for i in range(len(layers) - 1):
        modules.append(torch.nn.Linear(int(dim * layers[i]), int(dim * layers[i + 1])))
        last = i >= len(layers) - 2
        if fields["activation_func"] not in (None, "linear") and not (last and not fields["activate_output"]):
            modules.append(ACTIVATIONS[fields["activation_func"]]())
        if fields["is_layer_norm"]:
            modules.append(torch.nn.LayerNorm(int(dim * layers[i + 1])))
        if dropout[i + 1] > 0:
            modules.append(torch.nn.Dropout(p=dropout[i + 1]))
    return torch.nn.Sequential(*modules)


def a1111_loads(dim: int, state: dict, fields: dict) -> torch.nn.Sequential:
    """What A1111 does with one (k or v) entry: rename the oldest keys, then a strict load_state_dict."""
    state = OrderedDict(state)
    for old, new in (("linear1", "linear.0"), ("linear2", "linear.1")):
        for part in ("weight", "bias"):
            if f"{old}.{part}" in state:
                state[f"{new}.{part}"] = state.pop(f"{old}.{part}")
    module = torch.nn.Module()
    module.linear = a1111_module(dim, fields)
    module.load_state_dict(state, strict=True)
    return module


def save_like_a1111(path: Path, widths: tuple[int, ...], fields: dict, seed: int) -> dict:
    """Random modules built like A1111's, saved as its Hypernetwork.save does."""
    torch.manual_seed(seed)
    saved: dict = {}
    for width in widths:
        pair = []
        for _ in range(2):
            holder = torch.nn.Module()
            holder.linear = a1111_module(width, fields)
            for p in holder.parameters():
                torch.nn.init.normal_(p, std=0.02)
            pair.append(holder.state_dict())
        saved[width] = tuple(pair)
    saved.update(fields)
    torch.save(saved, path)
    return saved


SIMPLE = {"step": 2000, "name": "simple", "layer_structure": [1, 2, 1], "activation_func": "relu",
          "is_layer_norm": False, "weight_initialization": "Normal", "sd_checkpoint": "6ce0161689",
          "sd_checkpoint_name": "v1-5-pruned", "activate_output": False, "use_dropout": False,
          "dropout_structure": [0, 0, 0], "last_layer_dropout": False, "optional_info": None}
DEEP = {**SIMPLE, "name": "deep", "layer_structure": [1.0, 1.5, 1.5, 1.0], "activation_func": "swish",
        "is_layer_norm": True, "use_dropout": True, "dropout_structure": [0, 0.3, 0.3, 0], "last_layer_dropout": True,
        "activate_output": True, "weight_initialization": "XavierNormal", "optional_info": "trained on cats"}


@pytest.fixture(scope="module")
def simple(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("hn") / "simple.pt"
    return path, save_like_a1111(path, (768, 320), SIMPLE, seed=0)


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("hn") / "deep.pt"
    return path, save_like_a1111(path, (320,), DEEP, seed=1)


def tensors_of(saved: dict) -> dict[str, torch.Tensor]:
    return {f"{w}.{i}.{k}": t for w, pair in saved.items() if isinstance(w, int)
            for i, sd in enumerate(pair) for k, t in sd.items()}


@pytest.mark.parametrize("which", ["simple", "deep"])
def test_pt_to_safetensors_keeps_every_tensor_and_the_fields_in_metadata(which, request, tmp_path):
    src, saved = request.getfixturevalue(which)
    out = tmp_path / "hn.safetensors"
    report = convert_hypernetwork(src, out, "safetensors")
    with safe_open(str(out), framework="pt") as handle:
        written = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    expected = tensors_of(saved)
    assert set(written) == set(expected) and all(torch.equal(written[k], expected[k]) for k in expected)
    assert report["tensors"] == len(expected)
    assert json.loads(metadata["layer_structure"]) == saved["layer_structure"]
    assert metadata["activation_func"] == saved["activation_func"]  # strings stay plain
    assert metadata["is_layer_norm"] == json.dumps(saved["is_layer_norm"])
    assert json.loads(metadata["dropout_structure"]) == saved["dropout_structure"]
    found = probe(out)
    assert (found.kind, found.format) == ("hypernetwork", "safetensors")


@pytest.mark.parametrize("which", ["simple", "deep"])
def test_and_back_to_a1111_pt_that_a1111_can_load(which, request, tmp_path):
    src, saved = request.getfixturevalue(which)
    convert_hypernetwork(src, tmp_path / "hn.safetensors", "safetensors")
    report = convert_hypernetwork(tmp_path / "hn.safetensors", tmp_path / "back.pt", "a1111")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert {k: back[k] for k in A1111_READS} == {k: saved[k] for k in A1111_READS}
    assert report["warnings"] == []
    widths = [k for k in back if isinstance(k, int)]
    assert sorted(widths) == sorted(k for k in saved if isinstance(k, int))
    expected = tensors_of(saved)
    assert all(torch.equal(t, expected[k]) for k, t in tensors_of(back).items()) and len(tensors_of(back)) == len(
        expected
    )
    x = torch.randn(2, 5, widths[0])
    for side in (0, 1):
        assert isinstance(back[widths[0]], tuple) and len(back[widths[0]]) == 2
        original = a1111_loads(widths[0], saved[widths[0]][side], saved).eval()
        converted = a1111_loads(widths[0], back[widths[0]][side], back).eval()
        assert torch.equal(converted.linear(x), original.linear(x))


def test_oldest_file_without_fields_gets_a1111s_assumptions_written_out(tmp_path):
    torch.manual_seed(2)
    pair = tuple(OrderedDict(
        [("linear1.weight", torch.randn(640, 320)), ("linear1.bias", torch.randn(640)),
         ("linear2.weight", torch.randn(320, 640)), ("linear2.bias", torch.randn(320))]) for _ in range(2))
    torch.save({320: pair}, tmp_path / "old.pt")
    convert_hypernetwork(tmp_path / "old.pt", tmp_path / "old.safetensors", "safetensors")
    report = convert_hypernetwork(tmp_path / "old.safetensors", tmp_path / "again.pt", "a1111")
    back = torch.load(tmp_path / "again.pt", weights_only=True)
    assert back["layer_structure"] == [1, 2, 1] and back["activation_func"] is None
    assert back["activate_output"] is True and back["dropout_structure"] == [0, 0, 0] and back["name"] == "again"
    assert any("activate_output" in w for w in report["warnings"])
    assert torch.equal(back[320][1]["linear2.weight"], pair[1]["linear2.weight"])
    a1111_loads(320, back[320][0], back)


def test_metadata_that_does_not_fit_the_tensors_is_refused(simple, tmp_path):
    src, _ = simple
    convert_hypernetwork(src, tmp_path / "hn.safetensors", "safetensors")
    with safe_open(str(tmp_path / "hn.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = {k: v for k, v in handle.metadata().items() if k != "activation_func"}
    save_file(tensors, str(tmp_path / "lost.safetensors"), metadata=metadata)
    with pytest.raises(BadFileError, match="A1111 could not load it"):
        convert_hypernetwork(tmp_path / "lost.safetensors", tmp_path / "lost.pt", "a1111")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hn.safetensors", "lost.safetensors"]


def test_output_name_must_fit_the_container(simple, tmp_path):
    src, _ = simple
    with pytest.raises(AdapterzooError, match="name the output .pt"):
        convert_hypernetwork(src, tmp_path / "x.safetensors", "a1111")
    with pytest.raises(AdapterzooError, match="name the safetensors output .safetensors"):
        convert_hypernetwork(src, tmp_path / "x.pt", "safetensors")
