"""The adapterzoo command line: parse, call one room, print a table or --json. No logic here."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from adapterzoo import __version__
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.probe_result import BASES, KINDS

VERIFIABLE_KINDS = ["lora", "lycoris", "hypernetwork", "embedding", "vae", "checkpoint"]  # what verify reads


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Plain aligned columns; long values are cut so a row stays on one line."""
    if not rows:
        click.echo("(nothing)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c)))[:60] for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def print_module_report(report: dict[str, Any], columns: list[str]) -> None:
    """An ops report: per-module numbers (the long module name last, never cut), then the totals."""
    cells = [[_number(row.get(c)) for c in columns] for row in report["modules"]]
    widths = [max(len(c), *(len(cell[i]) for cell in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().rjust(w) for c, w in zip(columns, widths)) + "  MODULE")
    for row, cell in zip(report["modules"], cells):
        click.echo("  ".join(v.rjust(w) for v, w in zip(cell, widths)) + "  " + row["module"])
    click.echo(f"modules  {len(report['modules'])}")
    if "retained_fro" in report:
        click.echo(f"retained {report['retained_fro']:.4f} of ‖ΔW‖_F over all modules")
    for warning in report.get("warnings", []):
        click.echo(f"warning  {warning}")
    click.echo(f"wrote    {report['output']}")


def print_loras(report: dict[str, Any], columns: list[str]) -> None:
    """The LoRAs table of a report (the first column names the file), each key that landed nowhere, warnings."""
    print_table(report["loras"], columns)
    for lora in report["loras"]:
        for key in lora["unmatched"]:
            click.echo(f"unmatched {Path(lora[columns[0]]).name}: {key}")
    for warning in report["warnings"]:
        click.echo(f"warning  {warning}")


def provenance_hasher(*inputs: str | Path) -> Callable[[Path], str | dict[str, str]]:
    """How an ops command gets an input's SHA-256 for its output's provenance: from the registry (--db) for a
    scanned, unchanged file, else hashed. Called first thing, before the command imports torch: the inputs'
    hashing starts at once, in the background (merge asks from a thread, which has no click context)."""
    from adapterzoo.zoo.known_hashes import hash_in_background

    return hash_in_background(inputs, click.get_current_context().obj["db"])


class WeightedPath(click.ParamType):
    """FILE or FILE:W. Only a number after the last ':' is a weight, so a path may contain ':' itself."""

    name = "FILE[:W]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, float]:
        if isinstance(value, tuple):
            return value
        path, weight = value, 1.0
        head, sep, tail = value.rpartition(":")
        if sep:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        if not math.isfinite(weight):
            self.fail(f"{value}: the weight must be a finite number", param, ctx)
        if not Path(path).exists():
            self.fail(f"{path}: no such file (a weight goes after the last ':', as in lora.safetensors:0.7)",
                      param, ctx)
        return path, weight


DEVICE_OPTION = click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
                             show_default=True, help="Where to compute (fp32): auto picks cuda, then mps, then cpu.")
RULE_OPTIONS = (
    click.option("--rank", type=click.IntRange(min=1), metavar="N", help="Keep this many singular values per module."),
    click.option("--sv-ratio", type=click.FloatRange(min=1), metavar="X",
                 help="Keep every singular value >= the largest / X."),
    click.option("--sv-fro", type=click.FloatRange(0, 1, min_open=True), metavar="X",
                 help="Keep the smallest rank whose retained Frobenius fraction is >= X."),
    click.option("--sv-cumulative", type=click.FloatRange(0, 1, min_open=True), metavar="X",
                 help="Keep the smallest rank whose share of the singular-value sum is >= X."),
)


def rule_options(command: Any) -> Any:
    for option in reversed(RULE_OPTIONS):
        command = option(command)
    return command


def rank_rule(rank: int | None, sv_ratio: float | None, sv_fro: float | None, sv_cumulative: float | None) -> Any:
    """The one rank rule asked for (a `ops.lowrank` Rule), or None; two at once is a usage error."""
    from adapterzoo.ops.lowrank import Rank, SvCumulative, SvFro, SvRatio

    given = [(flag, value) for flag, value in (("--rank", rank), ("--sv-ratio", sv_ratio), ("--sv-fro", sv_fro),
                                              ("--sv-cumulative", sv_cumulative)) if value is not None]
    if len(given) > 1:
        raise click.UsageError(f"give one rank rule, not {' and '.join(flag for flag, _ in given)}")
    if rank is not None:
        return Rank(rank)
    if sv_ratio is not None:
        return SvRatio(sv_ratio)
    if sv_fro is not None:
        return SvFro(sv_fro)
    return SvCumulative(sv_cumulative) if sv_cumulative is not None else None


@click.group()
@click.version_option(__version__, prog_name="adapterzoo")
@click.option(
    "--db",
    metavar="URL",
    help="Registry: an SQLAlchemy URL or an SQLite file (default: $ADAPTERZOO_DB, else registry.db "
    "in $ADAPTERZOO_HOME or the user data folder).",
)
@click.pass_context
def cli(ctx: click.Context, db: str | None) -> None:
    """Index, read, convert, merge and verify Stable Diffusion checkpoints and adapters."""
    ctx.obj = {"db": db}


@cli.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def probe(path: str, as_json: bool) -> None:
    """Say what FILE (or diffusers/PEFT folder) is: kind, base, format, rank, alpha, dtype."""
    from adapterzoo.formats.probe import probe as probe_path

    result = probe_path(path).to_json()
    if as_json:
        emit_json(result)
        return
    for key in ("path", "kind", "base", "format", "rank", "alpha", "dtype", "tensors"):
        click.echo(f"{key:8} {result[key] if result[key] is not None else '-'}")
    for key, value in result["details"].items():
        click.echo(f"{key:8} {value}")
    for warning in result["warnings"]:
        click.echo(f"warning  {warning}")


@cli.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True, dir_okay=True))
@click.option("-o", "--output", "dest", metavar="OUT", required=True, type=click.Path(),
              help="Where to write the result.")
@click.option("--to", "to", required=True,
              type=click.Choice(["kohya", "diffusers", "peft", "bfl", "ldm", "a1111", "safetensors"]),
              help="LoRA: kohya|diffusers|peft (Flux also bfl); checkpoint: ldm|diffusers; "
              "embedding: a1111|kohya|diffusers; "
              "hypernetwork: safetensors|a1111.")
@click.option("--base", type=click.Choice(["sd1", "sd2", "sdxl", "flux"]),
              help="LoRA: read it as this base instead of the detected one.")
@click.option("--checkpoint", metavar="CKPT", type=click.Path(exists=True, dir_okay=True),
              help="LoRA: resolve module names against this model (SD or Flux, any size) "
              "instead of the built-in tables.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--token", help="Embedding: the token (name) to store where the target format has one.")
@click.option("--rank", type=click.IntRange(min=1), help="LoRA: the rank to write.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="Checkpoint: the dtype to write.")
@click.option("--prune-ema", is_flag=True, help="Checkpoint: leave out the EMA weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def convert(src: str, dest: str, to: str, as_json: bool, **options: Any) -> None:
    """Convert IN to another format of the same kind, written to OUT (never over IN)."""
    from adapterzoo.formats.convert import convert as convert_path

    report = convert_path(src, dest, to, **options)
    if as_json:
        emit_json(report)
        return
    click.echo(f"{report['kind']} {report['from']} -> {report['to']}")
    for path in report["outputs"]:
        click.echo(f"wrote    {path}")
    for warning in report.get("warnings", []):
        click.echo(f"warning  {warning}")


@cli.command()
@click.argument("checkpoint", metavar="CHECKPOINT", type=click.Path(exists=True, dir_okay=True))
@click.option("--lora", "loras", metavar="FILE[:W]", multiple=True, required=True, type=WeightedPath(),
              help="A LoRA-family file or PEFT folder and its weight (default 1); repeat for more.")
@click.option("-o", "--output", "dest", metavar="OUT", required=True, type=click.Path(),
              help="The merged checkpoint, in CHECKPOINT's layout (single .safetensors file or diffusers folder).")
@DEVICE_OPTION
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]),
              help="Write floating tensors in this dtype (default: each keeps the checkpoint's).")
@click.option("--allow-unmatched", is_flag=True, help="Merge what fits and list the LoRA keys that land nowhere.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def merge(checkpoint: str, loras: tuple[tuple[str, float], ...], dest: str, device: str, dtype: str | None,
          allow_unmatched: bool, force: bool, as_json: bool) -> None:
    """Merge LoRAs into CHECKPOINT's weights (W += weight·ΔW, computed in fp32), written to OUT."""
    sha256 = provenance_hasher(checkpoint, *(path for path, _ in loras))
    from adapterzoo.devices import pick_device
    from adapterzoo.ops.merge_checkpoint import LoraSpec, merge_checkpoint

    specs = [LoraSpec(Path(path), weight) for path, weight in loras]
    report = merge_checkpoint(checkpoint, specs, dest, sha256=sha256, device=pick_device(device),
                              dtype=dtype, allow_unmatched=allow_unmatched, force=force, progress_bar=not as_json)
    if as_json:
        emit_json(report)
        return
    print_loras(report, ["path", "weight", "format", "modules"])
    click.echo(f"merged   {report['tensors_merged']} tensors of {report['base']} {report['layout']} "
               f"({report['tensors_copied']} copied) on {report['device']} in {report['seconds']:.1f} s")
    click.echo(f"wrote    {report['output']}")


@cli.command("merge-loras")
@click.argument("inputs", metavar="FILE[:W]...", nargs=-1, required=True, type=WeightedPath())
@click.option("-o", "--output", "dest", metavar="OUT", required=True, type=click.Path(),
              help="The merged kohya LoRA (.safetensors).")
@click.option("--method", type=click.Choice(["concat", "svd"]), default="concat", show_default=True,
              help="concat: exact, ranks add up; svd: the sum re-factorised to a rank rule.")
@rule_options
@DEVICE_OPTION
@click.option("--checkpoint", metavar="CKPT", type=click.Path(exists=True, dir_okay=True),
              help="Resolve module names against this model instead of the built-in SD1/SD2/SDXL tables.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def merge_loras(inputs: tuple[tuple[str, float], ...], dest: str, method: str, device: str, checkpoint: str | None,
                force: bool, as_json: bool, **rule: Any) -> None:
    """Merge LoRAs of one base into one whose ΔW is the weighted sum (W after ':' defaults to 1)."""
    sha256 = provenance_hasher(*(path for path, _ in inputs), *([checkpoint] if checkpoint else []))
    from adapterzoo.devices import pick_device
    from adapterzoo.ops.merge_loras import merge_loras as merge

    chosen = rank_rule(**rule)
    if (chosen is None) == (method == "svd"):
        raise click.UsageError("--method svd needs a rank rule (--rank N, --sv-ratio X, --sv-fro X, --sv-cumulative X)"
                               if method == "svd" else "--method concat is exact and takes no rank rule")
    report = merge(list(inputs), dest, method, chosen, pick_device(device), sha256, force, checkpoint)
    if as_json:
        emit_json(report)
        return
    print_module_report(report, ["inputs", "rank", "retained_fro"] if method == "svd" else ["inputs", "rank"])


@cli.command()
@click.argument("src", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "dest", metavar="OUT", required=True, type=click.Path(),
              help="The resized kohya LoRA (.safetensors).")
@rule_options
@DEVICE_OPTION
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def resize(src: str, dest: str, device: str, force: bool, as_json: bool, **rule: Any) -> None:
    """Truncate every module of a kohya LoRA to a new rank, optimally (Eckart–Young), alpha kept right."""
    sha256 = provenance_hasher(src)
    from adapterzoo.devices import pick_device
    from adapterzoo.ops.resize import resize_lora

    chosen = rank_rule(**rule)
    if chosen is None:
        raise click.UsageError("say how to truncate: --rank N, --sv-ratio X, --sv-fro X or --sv-cumulative X")
    report = resize_lora(src, dest, chosen, pick_device(device), sha256, force)
    if as_json:
        emit_json(report)
        return
    print_module_report(report, ["rank", "kept_rank", "retained_fro"])


@cli.command()
@click.argument("base", metavar="BASE", type=click.Path(exists=True, dir_okay=True))
@click.argument("tuned", metavar="TUNED", type=click.Path(exists=True, dir_okay=True))
@click.option("-o", "--output", "dest", metavar="OUT", required=True, type=click.Path(),
              help="The extracted kohya LoRA (.safetensors).")
@click.option("--rank", type=click.IntRange(min=1), metavar="N", required=True, help="The LoRA's rank.")
@DEVICE_OPTION
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def extract(base: str, tuned: str, dest: str, rank: int, device: str, force: bool, as_json: bool) -> None:
    """Extract a LoRA of TUNED − BASE (two checkpoints of one model: single files or diffusers folders)."""
    sha256 = provenance_hasher(base, tuned)
    from adapterzoo.devices import pick_device
    from adapterzoo.ops.extract import extract_lora

    report = extract_lora(base, tuned, dest, rank, pick_device(device), sha256, force, progress_bar=not as_json)
    if as_json:
        emit_json(report)
        return
    print_module_report(report, ["rank", "retained_fro"])
    click.echo(f"skipped  {report['skipped_zero']} unchanged weight(s)")


@cli.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the counts and every entry found as JSON.")
@click.pass_obj
def scan(obj: dict[str, Any], dirs: tuple[str, ...], as_json: bool) -> None:
    """Index model files and folders under DIR... into the registry (only new or changed ones are read)."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.queries import entries_by_id
    from adapterzoo.zoo.scan import scan_paths

    engine = open_registry(obj["db"])
    report = scan_paths(dirs, engine, progress_bar=not as_json)
    if as_json:
        files = [e.to_json() for e in entries_by_id(engine, report.ids)]
        emit_json({**report.counts(), "problems": report.problems, "files": files})
        return
    for problem in report.problems:
        click.echo(f"{problem['status']}: {problem['path']}: {problem['error']}")
    click.echo(report.summary())


@cli.command("list")
@click.option("--kind", type=click.Choice(KINDS), help="Only entries of this kind.")
@click.option("--base", type=click.Choice(BASES), help="Only entries for this base model.")
@click.option("--query", metavar="TEXT",
              help="Only entries whose path, trigger words, or source's model name, version name or trained "
              "words contain TEXT.")
@click.option("--verdict", type=click.Choice(["pass", "fail", "never"]),
              help="Only entries whose latest verification passed / failed, or that were never verified.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def list_(obj: dict[str, Any], kind: str | None, base: str | None, query: str | None, verdict: str | None,
          as_json: bool) -> None:
    """List registry entries."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.queries import latest_verifications, list_entries

    engine = open_registry(obj["db"])
    latest = latest_verifications(engine)
    rows = [{**e.to_json(), "verified": latest[e.id].verdict if e.id in latest else None}
            for e in list_entries(engine, kind=kind, base=base, query=query, verdict=verdict)]
    if as_json:
        emit_json(rows)
        return
    print_table([{**r, "verified": r["verified"] or "-"} for r in rows],
                ["id", "kind", "base", "format", "rank", "autov2", "status", "verified", "name"])


@cli.command()
@click.argument("ref", metavar="ID|PATH|HASH")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def show(obj: dict[str, Any], ref: str, as_json: bool) -> None:
    """Show one registry entry, found by id, path, any of its hashes, or a sha256 prefix (8+ hex)."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.queries import find_entry, latest_verifications, sources_of

    engine = open_registry(obj["db"])
    found = find_entry(engine, ref)
    latest = latest_verifications(engine, found.id).get(found.id)
    entry = {**found.to_json(), "sources": [s.to_json() for s in sources_of(engine, found.id)],
             "verification": latest.to_json() if latest else None}
    if as_json:
        emit_json(entry)
        return
    verification = entry.pop("verification")
    for key, value in entry.items():
        if key == "metadata":
            value = f"{len(value)} keys (--json shows them)" if value else None
        elif key == "sources":
            for source in value:
                click.echo(f"{'source':14} {describe_source(source)}")
            continue
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, dict):
            value = json.dumps(value, default=str)
        click.echo(f"{key:14} {'-' if value in (None, '') else value}")
    if verification is None:
        click.echo(f"{'verified':14} never")
        return
    click.echo(f"{'verified':14} {verification['verdict']} on {verification['checkpoint']} ({verification['created']})")
    for reason in verification["reasons"]:
        click.echo(f"{'':14} - {reason}")
    click.echo(f"{'grid':14} {verification['grid'] or '-'}")


class SizeParam(click.ParamType):
    """WxH in pixels, e.g. 512x768."""

    name = "WxH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        width, sep, height = str(value).lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
            self.fail(f"{value!r} is not WxH (e.g. 512x512)", param, ctx)
        return int(width), int(height)


class CheckpointFor(click.ParamType):
    """BASE=CKPT for `verify --registry`: the checkpoint its BASE's files are rendered on."""

    name = "BASE=CKPT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, Path]:
        if isinstance(value, tuple):
            return value
        from adapterzoo.verify.verifier import BASES

        base, sep, path = str(value).partition("=")
        if not sep or base not in BASES:
            self.fail(f"{value!r} is not BASE=CKPT with BASE one of {', '.join(BASES)}", param, ctx)
        if not Path(path).exists():
            self.fail(f"{path}: no such checkpoint", param, ctx)
        return base, Path(path)


def grid_path(output: str | None, out_dir: str | None, file: str, several: bool,
              sha256: Callable[[Path], Any]) -> Path | None:
    """-o GRID.png for one file; with several, GRID-<file stem>.png beside it; --out-dir: DIR/<stem>-<sha>.png."""
    if out_dir is not None:
        from adapterzoo.verify.contact_sheet import grid_file
        from adapterzoo.verify.verifier import digest_of

        return grid_file(Path(out_dir), Path(file), digest_of(sha256(Path(file))))
    if output is None:
        return None
    grid = Path(output)
    return grid.with_name(f"{grid.stem}-{Path(file).stem}{grid.suffix or '.png'}") if several else grid


def print_verification(result: dict[str, Any]) -> None:
    coverage = result["coverage"]
    click.echo(f"{result['verdict'].upper()}  {result['file']}  ({result['kind']}, {result['format'] or '-'}, "
               f"{result['base']}; {result['seconds']:.1f} s)")
    click.echo(f"  coverage  {coverage['keys_matched']}/{coverage['keys_total']} keys, "
               f"{coverage['modules_hit']}/{coverage['modules_total']} modules ran")
    for effect in result["effects"]:
        noise = effect["noise_pred_rel_change"]
        click.echo(f"  m = {effect['multiplier']:<6g} pixels {effect['mean_abs_pixel_change']:.3f}/255"
                   + ("" if noise is None else f", noise prediction {noise:.2%}"))
    for reason in result["reasons"]:
        click.echo(f"  - {reason}")
    if result["grid"]:
        click.echo(f"  grid      {result['grid']}")


def verify_usage(files: tuple[str, ...], registry: bool, checkpoint: str | None, grid: str | None,
                 out_dir: str | None, library_options: dict[str, Any]) -> None:
    """FILE... with --checkpoint, or --registry with --out-dir: the two modes' flags do not mix."""
    if grid and out_dir:
        raise click.UsageError("give -o GRID.png or --out-dir DIR, not both")
    if registry:
        if files:
            raise click.UsageError("give FILE... or --registry, not both")
        if checkpoint or grid or not out_dir:
            raise click.UsageError("--registry writes to --out-dir DIR and takes --checkpoint-for BASE=CKPT "
                                   "(not --checkpoint or -o)")
        return
    if not files:
        raise click.UsageError("say what to verify: FILE... --checkpoint CKPT, or --registry --out-dir DIR")
    if not checkpoint:
        raise click.UsageError("FILE... is verified on --checkpoint CKPT")
    given = [f"--{name.replace('_', '-')}" for name, value in library_options.items() if value]
    if given:
        raise click.UsageError(f"{', '.join(given)}: only with --registry")


@cli.command()
@click.argument("files", metavar="[FILE]...", nargs=-1, type=click.Path(exists=True, dir_okay=True))
@click.option("--checkpoint", metavar="CKPT", type=click.Path(exists=True, dir_okay=True),
              help="The checkpoint (single file or diffusers folder) to apply each FILE to.")
@click.option("--registry", is_flag=True, help="Verify the registry's files instead of FILE... (needs --out-dir).")
@click.option("--kind", type=click.Choice(VERIFIABLE_KINDS),
              help="--registry: only this kind (checkpoints, each rendered alone, only when asked for).")
@click.option("--base", type=click.Choice(["sd1", "sd2", "sdxl"]), help="--registry: only files for this base.")
@click.option("--unverified", is_flag=True, help="--registry: only files never verified.")
@click.option("--checkpoint-for", "checkpoint_for", metavar="BASE=CKPT", multiple=True, type=CheckpointFor(),
              help="--registry: render BASE's files on CKPT (default: the one indexed checkpoint of BASE).")
@click.option("-o", "--output", "grid", metavar="GRID.png", type=click.Path(dir_okay=False),
              help="Write the grid here; with several files, GRID-<file stem>.png each.")
@click.option("--out-dir", metavar="DIR", type=click.Path(file_okay=False),
              help="A grid per file (DIR/<stem>-<sha256[:10]>.png) and DIR/index.html, a contact sheet of them.")
@click.option("--prompt", "prompts", metavar="P", multiple=True,
              help="Prompt (repeatable). Default: 'a photo of a cat'; for an embedding 'a photo of <its token>'.")
@click.option("--seed", "seeds", metavar="S", multiple=True, type=int, help="Seed (repeatable). Default: 0.")
@click.option("--multiplier", "multipliers", metavar="M", multiple=True, type=float,
              help="Grid column (repeatable). Default: 0, 0.5, 1.")
@click.option("--steps", type=click.IntRange(min=1), metavar="N", help="Sampling steps. Default: 20.")
@click.option("--size", type=SizeParam(), help="Image size. Default: the model's own (SD1.5 512, SDXL 1024).")
@DEVICE_OPTION
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="Default: fp16 on CUDA, else fp32.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per file (a list for several).")
@click.pass_obj
def verify(obj: dict[str, Any], files: tuple[str, ...], checkpoint: str | None, registry: bool, kind: str | None,
           base: str | None, unverified: bool, checkpoint_for: tuple[tuple[str, Path], ...], grid: str | None,
           out_dir: str | None, prompts: tuple[str, ...], seeds: tuple[int, ...], multipliers: tuple[float, ...],
           steps: int | None, size: tuple[int, int] | None, device: str, dtype: str | None, as_json: bool) -> None:
    """Render each FILE on CKPT (or, with --registry, each indexed file on a checkpoint of its base) at several
    multipliers and judge it: pass or fail, with every reason. Each result is stored in the registry; exit
    code 1 when any file fails."""
    verify_usage(files, registry, checkpoint, grid, out_dir,
                 {"kind": kind, "base": base, "unverified": unverified, "checkpoint_for": checkpoint_for})
    sha256 = provenance_hasher(*([checkpoint, *files] if checkpoint else []))
    from adapterzoo.verify.verifier import VerifyOptions
    from adapterzoo.zoo.db import open_registry

    options = VerifyOptions(prompts=list(prompts) or None, size=size, device=device, dtype=dtype)
    options.seeds = list(seeds) or options.seeds
    options.multipliers = list(multipliers) or options.multipliers
    options.steps = steps or options.steps
    engine = open_registry(obj["db"])
    if registry:
        verify_registry(engine, options, Path(out_dir), sha256, kind, base, unverified, dict(checkpoint_for),
                        as_json)
        return
    from adapterzoo.verify.contact_sheet import write_contact_sheet
    from adapterzoo.verify.verifier import Verifier
    from adapterzoo.zoo.verifications import record_verification

    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    verifier = Verifier(Path(checkpoint), options, sha256)
    results = []
    for file in files:
        result = verifier.verify(Path(file), grid_path(grid, out_dir, file, len(files) > 1, sha256))
        record_verification(engine, result)
        results.append(result)
        if not as_json:
            print_verification(result)
    passed = sum(r["verdict"] == "pass" for r in results)
    if out_dir:
        sheet = write_contact_sheet(Path(out_dir), results, f"{len(results)} verified: {passed} pass, "
                                                           f"{len(results) - passed} fail")
        if not as_json:
            click.echo(f"contact sheet {sheet}")
    if as_json:
        emit_json(results[0] if len(results) == 1 else results)
    if passed < len(results):
        sys.exit(1)


def verify_registry(engine: Any, options: Any, out_dir: Path, sha256: Callable[[Path], Any], kind: str | None,
                    base: str | None, unverified: bool, checkpoint_for: dict[str, Path], as_json: bool) -> None:
    """`verify --registry`: a row per file, the summary line, the contact sheet; exit 1 unless all passed."""
    from adapterzoo.verify_library import verify_library

    report = verify_library(engine, options, out_dir, sha256, kind, base, unverified, checkpoint_for,
                            progress_bar=not as_json)
    if as_json:
        emit_json(report.results)
    else:
        print_table([{**r, "name": Path(r["file"]).name, "why": "; ".join(r["reasons"])} for r in report.results],
                    ["verdict", "kind", "base", "name", "why"])
        click.echo(report.summary())
        click.echo(f"contact sheet {out_dir / 'index.html'}")
    if any(r["verdict"] != "pass" for r in report.results):
        sys.exit(1)


def describe_source(source: dict[str, Any]) -> str:
    """One line for `show`: where the file came from and what the source says it is."""
    where = {"civitai": f"civitai model {source['civitai_model_id']} version {source['civitai_version_id']}",
             "hf": f"hf {source['hf_repo']}/{source['hf_path']}@{source['hf_revision']}"}.get(
        source["provider"], source["download_url"] or source["provider"])
    parts = [where, " / ".join(n for n in (source["model_name"], source["version_name"]) if n)]
    if source["base_stated"]:
        parts.append(f"base {source['base_stated']}")
    if source["trained_words"]:
        parts.append("words " + ", ".join(source["trained_words"]))
    return "; ".join(p for p in parts if p)


@cli.command()
@click.argument("query")
@click.option("--source", type=click.Choice(["civitai", "hf", "all"]), default="all", show_default=True,
              help="Where to search (all: Civitai fills half the rows, the Hub the rest).")
@click.option("--kind", type=click.Choice([k for k in KINDS if k != "unknown"]), help="Only this kind.")
@click.option("--base", type=click.Choice([b for b in BASES if b != "unknown"]), help="Only this base model.")
@click.option("--sort", type=click.Choice(["downloads", "rating", "newest"]), default="downloads",
              show_default=True, help="Order of the results.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="At most this many rows (one per model version).")
@click.option("--nsfw", is_flag=True, help="Include models marked NSFW.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def search(obj: dict[str, Any], query: str, source: str, kind: str | None, base: str | None, sort: str,
           limit: int, nsfw: bool, as_json: bool) -> None:
    """Search Civitai and the Hugging Face Hub: one row per model version, marked when already in the registry."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.search import search as run_search

    hits = run_search(open_registry(obj["db"]), query, source, kind, base, sort, limit, nsfw)
    if as_json:
        emit_json([hit.json for hit in hits])
        return
    rows = [{**hit.row(), "model": hit.json["model_id"], "version": hit.json["version_id"],
             "have": "yes" if hit.json["in_registry"] else ""} for hit in hits]
    print_table(rows, ["source", "model", "version", "name", "kind", "base", "file", "size", "downloads", "have"])


@cli.command()
@click.argument("refs", metavar="[ID|PATH|HASH]...", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every file in the registry that has no Civitai source yet.")
@click.option("--retry-missing", is_flag=True, help="Ask again about files Civitai did not know before.")
@click.option("--write-sidecars", is_flag=True,
              help="Also write <name>.civitai.info and <name>.preview.png beside each file found "
              "(never replacing one).")
@click.option("--token", metavar="T", help="Civitai API token (default: $CIVITAI_API_TOKEN).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per file.")
@click.pass_obj
def enrich(obj: dict[str, Any], refs: tuple[str, ...], every: bool, retry_missing: bool, write_sidecars: bool,
           token: str | None, as_json: bool) -> None:
    """Look registry files up on Civitai by SHA-256 and record model, version, base and trained words."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.enrich import enrich as run_enrich

    if not refs and not every:
        raise click.UsageError("say which files: ID|PATH|HASH..., or --all for every file without a source")
    outcomes = [o.to_json() for o in run_enrich(open_registry(obj["db"]), list(refs), every, retry_missing,
                                                  write_sidecars, token)]
    if as_json:
        emit_json(outcomes)
        return
    for outcome in outcomes:
        source = outcome["source"]
        said = describe_source({**source, "provider": "civitai"}) if source else outcome["reason"]
        click.echo(f"{outcome['status']:8} {outcome['id']:>4}  {outcome['name']}: {said}")
        for path in outcome["sidecars"]:
            click.echo(f"wrote    {path}")
    counts = {s: sum(o["status"] == s for o in outcomes) for s in ("found", "unknown", "skipped")}
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items()))


@cli.command()
@click.argument("refs", metavar="REF...", nargs=-1)
@click.option("--dest", metavar="DIR", type=click.Path(file_okay=False),
              help="Download into DIR (default: the current folder).")
@click.option("--library", metavar="DIR", type=click.Path(file_okay=False),
              help="An A1111 or ComfyUI folder: each file goes where that UI looks for its kind, with "
              "<name>.civitai.info and <name>.preview.png beside it.")
@click.option("--layout", type=click.Choice(["a1111", "comfyui"]), help="The --library's layout. Default: a1111.")
@click.option("--token", metavar="T", help="Civitai API token (default: $CIVITAI_API_TOKEN); the Hub reads HF_TOKEN.")
@click.option("--lock", "lock_file", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="Also pull every file a lock file (from `adapterzoo lock`) lists, skipping those already there.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per REF.")
@click.pass_obj
def pull(obj: dict[str, Any], refs: tuple[str, ...], dest: str | None, library: str | None, layout: str | None,
         token: str | None, lock_file: str | None, as_json: bool) -> None:
    """Download REF... (civitai:VERSION_ID, civitai:model/MODEL_ID, a civitai.com model URL,
    hf:OWNER/REPO/PATH[@REV] or a URL), check it against the source's hashes, and register it with its source.
    Exit code 1 when any REF failed."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.pull import Target
    from adapterzoo.zoo.pull import pull as run_pull

    if dest and library:
        raise click.UsageError("give --dest or --library, not both")
    if layout and not library:
        raise click.UsageError("--layout goes with --library")
    if not refs and not lock_file:
        raise click.UsageError("say what to pull: REF..., or --lock FILE")
    target = Target(Path(dest or "."), Path(library) if library else None, layout or "a1111")
    outcomes = run_pull(open_registry(obj["db"]), list(refs), target, token, lock_file, progress_bar=not as_json)
    if as_json:
        emit_json([o.to_json() for o in outcomes])
    for outcome in [] if as_json else outcomes:
        if outcome.error:
            click.echo(f"{'failed':13} {outcome.ref}: {outcome.error}")
            continue
        about = ", ".join(str(v) for v in (outcome.kind, outcome.base) if v)
        click.echo(f"{outcome.status:13} {outcome.ref}  {outcome.path}  ({about}; AutoV2 {outcome.autov2})")
        for note in outcome.notes:
            click.echo(f"{'':13} {note}")
        for path in outcome.sidecars:
            click.echo(f"{'wrote':13} {path}")
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)


@cli.command()
@click.option("-o", "--output", "dest", metavar="FILE", required=True, type=click.Path(dir_okay=False),
              help="The lock file to write (JSON).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Also print what was written.")
@click.pass_obj
def lock(obj: dict[str, Any], dest: str, force: bool, as_json: bool) -> None:
    """Write every registry file that has a source (REF, name, kind, base, size, SHA-256) to a lock file."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.lock import write_lock

    body = write_lock(open_registry(obj["db"]), dest, force)
    if as_json:
        emit_json(body)
        return
    click.echo(f"wrote    {dest} ({len(body['files'])} files)")


@cli.command()
@click.option("--checkpoint", metavar="CKPT", required=True, type=click.Path(exists=True, dir_okay=True),
              help="The checkpoint (single file or diffusers folder).")
@click.option("--lora", "loras", metavar="FILE[:W]", multiple=True, required=True, type=WeightedPath(),
              help="A LoRA-family file or PEFT folder and its weight (default 1); repeat for more, in order.")
@click.option("--prompt", required=True, metavar="P", help="The prompt.")
@click.option("--negative-prompt", metavar="N", default="", help="The negative prompt (default: empty).")
@click.option("--seed", type=int, default=0, show_default=True, metavar="S", help="Seed of the starting noise.")
@click.option("-o", "--output", "dest", metavar="OUT.png", required=True, type=click.Path(dir_okay=False),
              help="The image (PNG, with A1111's parameters chunk).")
@click.option("--compose", type=click.Choice(["merge", "switch", "composite"]), default="merge", show_default=True,
              help="merge: every LoRA every step at its weight. switch: one LoRA per step, LoRA i(s) = "
                   "floor(s / K) mod k at step s (0-based), in the order given. composite: each step, the "
                   "guided prediction of each LoRA alone, averaged (k UNet batches per step).")
@click.option("--switch-every", type=click.IntRange(min=1), metavar="K",
              help="switch: steps per LoRA (default 5). The clean cycle above; the reference code gives the "
                   "first LoRA K+1 steps.")
@click.option("--autolora", type=float, metavar="GAMMA",
              help="AutoLoRA: base + GAMMA x (with LoRAs - base), both CFG-guided; 'with LoRAs' is what "
                   "--compose predicts. 0 is the model without the LoRAs, 1 the LoRAs alone (2 UNet batches).")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, metavar="N",
              help="Sampling steps.")
@click.option("--size", type=SizeParam(), help="Image size. Default: the base's (512, 768, 1024).")
@DEVICE_OPTION
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="Default: fp16 on CUDA, else fp32.")
@click.option("--force", is_flag=True, help="Replace OUT.png if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def sample(checkpoint: str, loras: tuple[tuple[str, float], ...], prompt: str, negative_prompt: str, seed: int,
           dest: str, compose: str, switch_every: int | None, autolora: float | None, steps: int,
           size: tuple[int, int] | None, device: str, dtype: str | None, force: bool, as_json: bool) -> None:
    """Render one image from CKPT with several LoRAs composed while sampling (merge, LoRA Switch, LoRA
    Composite, each optionally mixed with the bare model by AutoLoRA's GAMMA). Text-encoder LoRAs act
    merge-style in every mode: the prompt is encoded once, with every LoRA on."""
    if switch_every is not None and compose != "switch":
        raise click.UsageError("--switch-every is for --compose switch")
    if autolora is not None and not math.isfinite(autolora):
        raise click.UsageError("--autolora takes a finite number")
    sha256 = provenance_hasher(checkpoint, *(path for path, _ in loras))
    from adapterzoo.verify.compose import DEFAULT_SWITCH_EVERY, Composition
    from adapterzoo.verify.sample import SampleOptions, sample as render_sample

    composition = Composition(compose, switch_every or DEFAULT_SWITCH_EVERY, autolora)
    options = SampleOptions(prompt, [(Path(path), weight) for path, weight in loras], seed, steps, size,
                            negative_prompt, composition, device, dtype)
    report = render_sample(Path(checkpoint), options, Path(dest), sha256, force=force, progress_bar=not as_json)
    if as_json:
        emit_json(report)
        return
    print_loras(report, ["file", "weight", "modules", "modules_hit"])
    mix = "" if report["autolora"] is None else f", AutoLoRA {report['autolora']:g}"
    click.echo(f"sampled  {report['compose']}{mix}, {report['steps']} steps, seed {report['seed']}, "
               f"{report['size'][0]}x{report['size'][1]} on {report['device']} in {report['seconds']:.1f} s")
    click.echo(f"wrote    {report['output']}")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for the tour's files (default: a new temp folder).")
def demo(out: str | None) -> None:
    """The whole tour on a built-in tiny model, offline: build a small library, index it, and more."""
    import tempfile
    from pathlib import Path

    from adapterzoo.demo import DemoStep, run_demo

    def show(step: DemoStep) -> None:
        click.secho(f"\n== {step.title}", bold=True)
        click.echo(f"$ {step.command}")
        if step.columns:
            print_table(step.rows, step.columns)
        for line in step.lines:
            click.echo(line)

    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="adapterzoo-demo-"))
    run_demo(root, show)
    click.echo(f"\nEverything the tour made is in {root}")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AdapterzooError as exc:
        if "--json" in sys.argv[1:]:
            emit_json({"error": str(exc), **exc.json_details()})
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
