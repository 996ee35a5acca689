"""probe and convert: what a file is, and the same file in another dialect."""

from __future__ import annotations

from typing import Any

import click

from adapterzoo.cli.group import cli
from adapterzoo.cli.output import emit_json
from adapterzoo.cli.params import use_threads
from adapterzoo.formats.model.registry import lora_bases, lora_targets


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
              type=click.Choice([*lora_targets(), "ldm", "a1111", "safetensors"]),
              help=f"LoRA: {'|'.join(lora_targets())} (a family's own dialect for its LoRAs only); "
              "checkpoint: ldm|diffusers; embedding: a1111|kohya|diffusers; hypernetwork: safetensors|a1111.")
@click.option("--base", type=click.Choice(lora_bases()),
              help="LoRA: read it as this base instead of the detected one.")
@click.option("--checkpoint", metavar="CKPT", type=click.Path(exists=True, dir_okay=True),
              help="LoRA: resolve module names against this model (any family's, any size) "
              "instead of the built-in tables.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--token", help="Embedding: the token (name) to store where the target format has one.")
@click.option("--rank", type=click.IntRange(min=1), help="LoRA: the rank to write.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="Checkpoint: the dtype to write.")
@click.option("--prune-ema", is_flag=True, help="Checkpoint: leave out the EMA weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def convert(src: str, dest: str, to: str, as_json: bool, **options: Any) -> None:
    """Convert IN to another format of the same kind, written to OUT (never over IN)."""
    use_threads()
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
