"""Suite-wide settings."""

import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ("fake_civitai", "fake_hub", "pg_server")  # fake_civitai, fake_hub; postgres_url, registry_db
# Commands set torch's threads from it (devices.cpu_threads): in-process they would otherwise take every core.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads; on 2 busy cores, OpenMP hand-offs make them ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def registry_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test may touch the user's real registry: each gets its own ADAPTERZOO_HOME."""
    home = tmp_path / "home"
    monkeypatch.setenv("ADAPTERZOO_HOME", str(home))
    monkeypatch.delenv("ADAPTERZOO_DB", raising=False)
    return home


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """`cli(*args, host=H)`: the command line in-process as host H (tests/library_layout.py)."""
    from library_layout import Cli

    return Cli(capsys, monkeypatch)
