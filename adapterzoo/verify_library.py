"""`verify --registry`: verify the indexed library in bulk, each file on a checkpoint of its base.

It needs the registry (which files, which checkpoints, where results go) and the verifier, and `verify/`
may not import `zoo/`: so, like `demo.py`, it lives beside `cli/` as the one place that joins them.
One Verifier per checkpoint (its pipeline is loaded once and released before the next base); a bad file
is a fail with its reason, and the run goes on; unsafe, broken and missing entries are reported unopened.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Engine
from tqdm import tqdm

from adapterzoo import __version__
from adapterzoo.errors import AdapterzooError
from adapterzoo.verify.contact_sheet import grid_file, write_contact_sheet
from adapterzoo.verify.verifier import BASES, Verifier, VerifyOptions, digest_of
from adapterzoo.zoo.db import home_folder
from adapterzoo.zoo.hosts import current_host
from adapterzoo.zoo.models import FileEntry
from adapterzoo.zoo.queries import list_entries
from adapterzoo.zoo.verifications import record_verification
from adapterzoo.zoo.verify_queue import Job

ADAPTERS = ("lora", "lycoris", "hypernetwork", "embedding", "vae")  # verified on a checkpoint of their base
UNOPENED = ("missing", "unsafe", "broken")


@dataclass
class LibraryReport:
    results: list[dict[str, Any]] = field(default_factory=list)  # `verify --json` objects, plus "skipped"
    left_out: Counter = field(default_factory=Counter)  # kind -> entries selected that are not verified here

    def summary(self) -> str:
        """'12 verified: 9 pass, 3 fail; 2 skipped (1 unsafe, 1 broken); 1 left out (checkpoint)'."""
        opened = [r for r in self.results if r["skipped"] is None]
        verdicts = Counter(r["verdict"] for r in opened)
        line = f"{len(opened)} verified: {verdicts['pass']} pass, {verdicts['fail']} fail"
        skipped = Counter(r["skipped"] for r in self.results if r["skipped"] is not None)
        if skipped:
            line += f"; {sum(skipped.values())} skipped ({', '.join(f'{n} {why}' for why, n in skipped.items())})"
        if self.left_out:
            line += f"; {sum(self.left_out.values())} left out ({', '.join(sorted(self.left_out))})"
        return line


def unopened_result(entry: FileEntry, why: str, reason: str) -> dict[str, Any]:
    """What is said of a file that was not opened: a fail, with why it was not."""
    return {"file": entry.path, "sha256": entry.sha256, "kind": entry.kind, "base": entry.base,
            "format": entry.format, "checkpoint": None, "checkpoint_sha256": None, "verdict": "fail",
            "reasons": [reason], "coverage": None, "effects": [], "grid": None, "seconds": 0.0, "parameters": None,
            "version": __version__, "skipped": why}


def failed_result(entry: FileEntry | Job | SimpleNamespace, checkpoint: Path, checkpoint_sha256: str | None, sha: str | None,
                  reason: str, start: float) -> dict[str, Any]:
    """A file that could not be verified: a fail with the one line its error says, recorded like any result."""
    return {"file": entry.path, "sha256": sha, "kind": entry.kind, "base": entry.base, "format": entry.format,
            "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_sha256, "verdict": "fail",
            "reasons": [reason], "coverage": None, "effects": [], "grid": None,
            "seconds": round(time.monotonic() - start, 3), "parameters": {}, "version": __version__, "skipped": None}


def error_line(exc: Exception) -> str:
    """Our own errors say what and why; anything else names its type (as scan does for a failed probe)."""
    return str(exc) if isinstance(exc, AdapterzooError) else f"verify failed: {type(exc).__name__}: {exc}"


def _checkpoint_for(engine: Engine, base: str, given: dict[str, Path]) -> Path | str:
    """The checkpoint given for `base`, else the one readable indexed checkpoint of it; else why not."""
    if base in given:
        return given[base]
    if base not in BASES:
        return ("base unknown: verify it alone, `adapterzoo verify FILE --checkpoint CKPT`" if base == "unknown"
                else f"a {base} file: verify renders {', '.join(BASES)}")
    found = [e for e in list_entries(engine, kind="checkpoint", base=base, host=current_host()) if e.status == "ok"]
    if len(found) == 1:
        return Path(found[0].path)
    hint = f"give --checkpoint-for {base}=CKPT"
    if not found:
        return f"no checkpoint for {base}: {hint}"
    return f"{len(found)} {base} checkpoints indexed, which one? {hint}"


def baseline_cache() -> Path:
    """Where the checkpoints' own renders and predictions are kept between runs (verify/baseline_cache.py)."""
    return home_folder() / "verify-cache"


def verify_each(engine: Engine, checkpoint: Path, files: list[Path], options: VerifyOptions,
                sha256_of: Callable[[Path], Any], grid_for: Callable[[Path], Path | None],
                keep_going: bool = False) -> Iterator[dict[str, Any]]:
    """`verify FILE... --checkpoint CKPT`: each file on one checkpoint (its pipeline loaded once), each result
    recorded in the registry and yielded as it lands. A file that cannot be verified raises its error, or, with
    `keep_going` (a batch), is a fail with its reason and the others go on."""
    verifier = Verifier(checkpoint, options, sha256_of, baseline_cache())
    for file in files:
        start, sha = time.monotonic(), None
        try:
            sha = digest_of(sha256_of(file))
            result = verifier.verify(file, grid_for(file))
        except Exception as exc:  # noqa: BLE001 - in a batch, a bad file is a fail with its reason
            if not keep_going:
                raise
            unread = SimpleNamespace(path=str(file), kind=None, base=None, format=None)
            result = failed_result(unread, checkpoint, verifier.checkpoint_sha256, sha, error_line(exc), start)
        record_verification(engine, result)
        yield result


def select_library(engine: Engine, kind: str | None = None, base: str | None = None, unverified: bool = False,
                   checkpoints: bool = False) -> tuple[dict[str, list[FileEntry]], LibraryReport]:
    """The registry's entries this host reaches, of `kind` and `base` (only those never verified if `unverified`)
    that verify opens, grouped by base (a checkpoint: by its own path); and a report holding those it does not
    open (unsafe, broken, missing) and the kinds it leaves out. Checkpoints are selected only when asked for (`kind` checkpoint, or
    `checkpoints` with every kind): a library's checkpoints are what its other files are verified on, and
    loading each is the slow part."""
    kinds = (kind,) if kind else ADAPTERS + (("checkpoint",) if checkpoints else ())
    report = LibraryReport()
    groups: dict[str, list[FileEntry]] = {}
    for entry in list_entries(engine, kind=kind, base=base, verdict="never" if unverified else None,
                              host=current_host()):
        if entry.status in UNOPENED:
            report.results.append(unopened_result(entry, entry.status,
                                                  f"{entry.status}: {entry.error or 'file not found'}"))
        elif entry.kind in kinds:
            groups.setdefault(entry.path if entry.kind == "checkpoint" else entry.base, []).append(entry)
        else:
            report.left_out[entry.kind] += 1
    return dict(sorted(groups.items())), report


def group_checkpoint(engine: Engine, entries: list[FileEntry], given: dict[str, Path]) -> Path | str:
    """What a group of `select_library` renders on: a checkpoint itself, else its base's checkpoint; or why none."""
    if entries[0].kind == "checkpoint":
        return Path(entries[0].path)
    return _checkpoint_for(engine, entries[0].base, given)


def verify_library(engine: Engine, options: VerifyOptions, out_dir: Path, sha256_of: Callable[[Path], Any],
                   kind: str | None = None, base: str | None = None, unverified: bool = False,
                   checkpoint_for: dict[str, Path] | None = None, checkpoints: bool = False,
                   progress_bar: bool = True) -> LibraryReport:
    """Verify the entries `select_library` picks, record each result, write a grid per file and DIR/index.html."""
    given = checkpoint_for or {}
    sha256_of = cache(sha256_of)  # asked for the grid's name and again by the verifier
    out_dir.mkdir(parents=True, exist_ok=True)
    groups, report = select_library(engine, kind, base, unverified, checkpoints)
    todo = sum(len(entries) for entries in groups.values())
    with tqdm(total=todo, desc="verify", unit="file", disable=None if progress_bar else True) as bar:
        for entries in groups.values():
            checkpoint = group_checkpoint(engine, entries, given)
            report.results += _verify_group(engine, entries, checkpoint, options, out_dir, sha256_of, bar)
    write_contact_sheet(out_dir, report.results, report.summary())
    return report


def _verify_group(engine: Engine, entries: list[FileEntry], checkpoint: Path | str, options: VerifyOptions,
                  out_dir: Path, sha256_of: Callable[[Path], Any], bar: tqdm) -> list[dict[str, Any]]:
    """The files of one base on its checkpoint (or a checkpoint on itself): one pipeline load for them all."""
    if isinstance(checkpoint, str):
        bar.update(len(entries))
        return [unopened_result(entry, "no checkpoint", checkpoint) for entry in entries]
    itself = entries[0].kind == "checkpoint"
    start = time.monotonic()
    try:
        verifier = Verifier(checkpoint, options, sha256_of, baseline_cache())
    except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not stop the library
        bar.update(len(entries))
        if itself:  # the checkpoint under test does not load: its own fail
            result = failed_result(entries[0], checkpoint, None, None, error_line(exc), start)
            record_verification(engine, result)
            return [result]
        return [unopened_result(e, "no checkpoint", f"checkpoint {checkpoint.name}: {error_line(exc)}")
                for e in entries]
    if not itself and entries[0].base != verifier.base:
        bar.update(len(entries))
        return [unopened_result(e, "no checkpoint", f"{checkpoint.name} is an {verifier.base} checkpoint, not "
                                                    f"{entries[0].base}") for e in entries]
    results = []
    for entry in entries:
        result = verify_entry(verifier, entry, out_dir, sha256_of)
        record_verification(engine, result)
        results.append(result)
        bar.update(1)
    del verifier
    gc.collect()  # the pipeline goes before the next base's is loaded
    return results


def verify_entry(verifier: Verifier, entry: FileEntry | Job, out_dir: Path, sha256_of: Callable[[Path], Any]
                 ) -> dict[str, Any]:
    """One file's result, its grid in `out_dir`; a file that cannot be verified is a fail with its reason."""
    start, sha = time.monotonic(), None
    try:
        sha = digest_of(sha256_of(Path(entry.path)))
        result = verifier.verify(Path(entry.path), grid_file(out_dir, Path(entry.path), sha))
    except Exception as exc:  # noqa: BLE001 - a bad file is a fail with its reason; the run goes on
        result = failed_result(entry, verifier.checkpoint, verifier.checkpoint_sha256, sha, error_line(exc), start)
    result["skipped"] = None
    return result
