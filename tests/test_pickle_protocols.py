"""Torch pickles of every protocol and container (torch zip, legacy stream, legacy tar, raw pickle).

Benign files read exactly as torch.load reads them; hostile ones are refused as unsafe, named by
what they would import, and never run — including those that reach code through attribute chains,
hide their names in the memo, or carry a second torch file as bytes.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import factory
import pytest
import torch

from adapterzoo.cli import main
from adapterzoo.errors import BadFileError, UnsafeFileError
from adapterzoo.formats.io.pickle_safe import load_pickle
from adapterzoo.formats.probe import probe

HOSTILE_NAMES = {  # what each payload imports, as Python 3 names it
    "os-system": f"{os.system.__module__}.system",
    "builtins-exec": "builtins.exec",
    "subprocess-popen": "subprocess.Popen",
    "builtins-open": f"{open.__module__}.open",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pickles")


def benign() -> dict:
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    return {
        "state_dict": OrderedDict(a=weights, view=weights[1:, 2:], half=torch.arange(6, dtype=torch.float16),
                                  bf=torch.ones(2, 2, dtype=torch.bfloat16), ids=torch.tensor([265, 7])),
        "param": torch.nn.Parameter(torch.full((2,), 0.5)),
        "step": 7, "name": "concept", "raw": b"\x00\xff\x80PK", "shape": torch.Size([2, 3]),
        "nested": [(1, 2.5, None, True), {"k": {3, 4}}],
    }


def assert_same(ours, reference, where="") -> None:
    assert type(ours) is type(reference), where
    if isinstance(reference, torch.Tensor):
        assert ours.dtype == reference.dtype and ours.shape == reference.shape, where
        assert torch.equal(ours, reference), where
    elif isinstance(reference, dict):
        assert list(ours) == list(reference), where
        for key in reference:
            assert_same(ours[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, (list, tuple)) and not isinstance(reference, torch.Size):
        assert len(ours) == len(reference), where
        for i, (a, b) in enumerate(zip(ours, reference)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == reference, where


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("protocol", factory.PICKLE_PROTOCOLS)
def test_benign_file_of_any_protocol_reads_as_torch_load_does(root, protocol, zipped):
    path = root / f"benign-p{protocol}-{'zip' if zipped else 'legacy'}.pt"
    torch.save(benign(), path, pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
    reference = torch.load(path, weights_only=False)  # our own benign file: the unrestricted reference
    ours = load_pickle(path)
    assert_same(ours, reference)
    a, view = ours["state_dict"]["a"], ours["state_dict"]["view"]
    assert view.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()  # a view stays a view


@pytest.mark.parametrize("name", ["legacy-attn-processor-sd1", "hypernetwork-a1111", "embedding-a1111-sd1",
                                  "embedding-textual-inversion-parameterdict"])
@pytest.mark.parametrize("protocol", [4, 5])
def test_protocol_4_and_5_files_probe_as_protocol_2_does(root, name, protocol):
    case = factory.build(name, root / f"p{protocol}")
    original = torch.load(case.path, weights_only=False)
    expected = probe(case.path)
    # torch's legacy stream records an nn.Module's source beside it, which no weights-only reader takes
    for zipped in (True,) if "parameterdict" in name else (True, False):
        again = case.path.with_name(f"again-{zipped}{case.path.suffix}")
        torch.save(original, again, pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
        got = probe(again)
        assert (got.kind, got.base, got.format, got.tensors, got.dtype, got.details) == (
            expected.kind, expected.base, expected.format, expected.tensors, expected.dtype, expected.details)


@pytest.mark.parametrize("protocol", factory.PICKLE_PROTOCOLS)
@pytest.mark.parametrize("suffix", factory.HOSTILE_CONTAINERS)
@pytest.mark.parametrize("payload", factory.HOSTILE_PAYLOADS)
def test_hostile_payload_of_any_protocol_is_named_and_never_runs(root, payload, suffix, protocol):
    evil = factory.hostile(payload, suffix, root / "hostile", protocol)
    with pytest.raises(UnsafeFileError) as refused:
        probe(evil.path)
    assert str(refused.value).startswith(f"{evil.path.name}: unsafe pickle: it would import ")
    assert HOSTILE_NAMES[payload] in str(refused.value)
    assert str(refused.value).endswith("; refused, nothing was run")
    assert not evil.marker.exists(), "the payload ran"


@pytest.mark.parametrize("container", list(factory.CHAIN_CONTAINERS))
@pytest.mark.parametrize("chain", list(factory.chained_pickles(Path("m"))))
def test_attribute_chains_are_named_in_every_container_and_never_run(root, chain, container):
    folder = root / "chains" / f"{chain}-{container}"
    folder.mkdir(parents=True)
    data, name = factory.chained_pickles(folder / "PWNED")[chain]
    path = factory.CHAIN_CONTAINERS[container](folder / "model.pt", data)
    with pytest.raises(UnsafeFileError, match=f"it would import .*{name}"):
        probe(path)
    assert not (folder / "PWNED").exists(), "the payload ran"


def test_chained_pickles_really_are_live(tmp_path):
    """Guard for the test above: plain pickle runs each one."""
    for chain, (data, _) in factory.chained_pickles(tmp_path / "PWNED").items():
        pickle.loads(data)  # noqa: S301 - deliberately, in a temp folder, to prove the payload works
        assert (tmp_path / "PWNED").exists(), chain
        (tmp_path / "PWNED").unlink()


@pytest.mark.parametrize("protocol", factory.PICKLE_PROTOCOLS)
def test_torch_file_nested_as_bytes_is_named_by_what_it_would_import(root, protocol):
    evil = factory.nested_hostile(root / "nested", protocol)
    with pytest.raises(UnsafeFileError) as refused:
        load_pickle(evil.path)
    assert HOSTILE_NAMES["os-system"] in str(refused.value) and "torch.serialization.load" in str(refused.value)
    assert not evil.marker.exists()


def test_benign_legacy_tar_is_broken_not_unsafe(tmp_path):
    path = factory.legacy_tar_around(tmp_path / "old.pt", pickle.dumps({"step": 1}, protocol=2))
    with pytest.raises(BadFileError, match="legacy tar format") as refused:
        load_pickle(path)
    assert not isinstance(refused.value, UnsafeFileError)


def test_cli_names_a_chained_global_in_one_line(tmp_path, monkeypatch, capsys):
    data, _ = factory.chained_pickles(tmp_path / "PWNED")["getattr-chain"]
    path = factory.legacy_tar_around(tmp_path / "model.ckpt", data)
    monkeypatch.setattr(sys, "argv", ["adapterzoo", "probe", str(path)])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and not (tmp_path / "PWNED").exists()
    assert err == ("error: model.ckpt: unsafe pickle: it would import builtins.getattr, builtins.__import__; "
                   "refused, nothing was run\n")


def test_torchscript_archive_is_refused_as_unsafe(tmp_path):
    """TorchScript carries code; torch.load without weights_only would hand it to torch.jit.load."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(UnsafeFileError, match="it would import __torch__"):
        probe(path)
