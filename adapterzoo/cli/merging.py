"""merge, merge-loras, resize, extract: the tensor math commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterzoo.cli.group import cli
from adapterzoo.cli.output import emit_json, print_loras, print_module_report
from adapterzoo.cli.params import (
    DEVICE_OPTION,
    WeightedPath,
    provenance_hasher,
    rank_rule,
    rule_options,
    use_threads,
)

# merge and merge-loras: the files' names are all that tells such members apart (`formats.members`)
VARIANT_MISMATCH_OPTION = click.option(
    "--allow-variant-mismatch", is_flag=True,
    help="Merge files that declare different members of a family whose weights are alike (a high-noise and a "
    "low-noise expert, turbo and base: read from file names or metadata), with a warning instead of refusing.")


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
@VARIANT_MISMATCH_OPTION
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def merge(checkpoint: str, loras: tuple[tuple[str, float], ...], dest: str, device: str, dtype: str | None,
          allow_unmatched: bool, allow_variant_mismatch: bool, force: bool, as_json: bool) -> None:
    """Merge LoRAs into CHECKPOINT's weights (W += weight·ΔW, computed in fp32), written to OUT."""
    sha256 = provenance_hasher(checkpoint, *(path for path, _ in loras))
    use_threads()
    from adapterzoo.devices import pick_device
    from adapterzoo.ops.merge_checkpoint import LoraSpec, merge_checkpoint

    specs = [LoraSpec(Path(path), weight) for path, weight in loras]
    report = merge_checkpoint(checkpoint, specs, dest, sha256=sha256, device=pick_device(device),
                              dtype=dtype, allow_unmatched=allow_unmatched,
                              allow_variant_mismatch=allow_variant_mismatch, force=force, progress_bar=not as_json)
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
              help="Resolve module names against this model instead of the built-in tables of its base.")
@VARIANT_MISMATCH_OPTION
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def merge_loras(inputs: tuple[tuple[str, float], ...], dest: str, method: str, device: str, checkpoint: str | None,
                allow_variant_mismatch: bool, force: bool, as_json: bool, **rule: Any) -> None:
    """Merge LoRAs of one base into one whose ΔW is the weighted sum (W after ':' defaults to 1)."""
    sha256 = provenance_hasher(*(path for path, _ in inputs), *([checkpoint] if checkpoint else []))
    use_threads()
    from adapterzoo.devices import pick_device
    from adapterzoo.ops.merge_loras import merge_loras as merge

    chosen = rank_rule(**rule)
    if (chosen is None) == (method == "svd"):
        raise click.UsageError("--method svd needs a rank rule (--rank N, --sv-ratio X, --sv-fro X, --sv-cumulative X)"
                               if method == "svd" else "--method concat is exact and takes no rank rule")
    report = merge(list(inputs), dest, method, chosen, pick_device(device), sha256, force, checkpoint,
                   allow_variant_mismatch)
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
    use_threads()
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
    use_threads()
    from adapterzoo.devices import pick_device
    from adapterzoo.ops.extract import extract_lora

    report = extract_lora(base, tuned, dest, rank, pick_device(device), sha256, force, progress_bar=not as_json)
    if as_json:
        emit_json(report)
        return
    print_module_report(report, ["rank", "retained_fro"])
    click.echo(f"skipped  {report['skipped_zero']} unchanged weight(s)")
