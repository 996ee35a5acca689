"""Shipped module tables: each equals what diffusers and transformers build today, standard single files and the
built-in bases are resolved from them without importing either library, and nothing else changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import factory
import pytest

from adapterzoo.formats.checkpoint_targets import checkpoint_targets
from adapterzoo.formats.model import module_tables
from adapterzoo.formats.model.module_tables import build_on_meta, shipped_keys, shipped_table, table_of

STANDARD = {"sd1": 4, "sd2": 4, "sdxl": 4, "sd1-inpainting": 9, "sdxl-inpainting": 9}


@pytest.fixture(scope="module")
def standard_files(tmp_path_factory) -> dict[str, Path]:
    """Sparse single files with every real key and shape of each standard checkpoint."""
    folder = tmp_path_factory.mktemp("standard")
    return {name: factory.write_sparse_safetensors(folder / f"{name}.safetensors",
                                                   factory.sd_checkpoint_specs(name.split("-")[0], in_channels=ch))
            for name, ch in STANDARD.items()}


@pytest.mark.parametrize("key", shipped_keys())
def test_every_shipped_table_is_what_the_libraries_build(key):
    model_class, config = json.loads(key)
    built = table_of(build_on_meta(model_class, config))
    shipped = shipped_table(key)
    assert shipped.modules == built.modules
    assert shipped.config == json.loads(json.dumps(built.config))


def test_standard_files_and_builtin_bases_resolve_without_importing_diffusers(standard_files):
    script = """
import json, sys
from adapterzoo.formats.checkpoint_targets import checkpoint_targets
from adapterzoo.formats.model.architectures import builtin_architecture
counts = {p: len(checkpoint_targets(p).locations) for p in sys.argv[1:]}
counts.update({b: len(builtin_architecture(b).targets) for b in ("sd1", "sd2", "sdxl")})
print(json.dumps({"imported": sorted({"diffusers", "transformers"} & set(sys.modules)), "counts": counts}))
"""
    done = subprocess.run([sys.executable, "-c", script, *map(str, standard_files.values())],
                          capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert report["imported"] == []
    assert all(count > 100 for count in report["counts"].values())


@pytest.mark.parametrize("name", sorted(STANDARD))
def test_shipped_tables_resolve_a_file_exactly_as_building_the_models_does(standard_files, name, monkeypatch):
    shipped = checkpoint_targets(standard_files[name])
    monkeypatch.setattr(module_tables, "shipped_table", lambda key: None)
    built = checkpoint_targets(standard_files[name])
    assert list(shipped.architecture.targets.items()) == list(built.architecture.targets.items())
    assert shipped.architecture.aliases == built.architecture.aliases
    assert shipped.locations == built.locations
