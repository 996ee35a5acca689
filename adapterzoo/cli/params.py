"""Parameter types and option sets that several commands share."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def provenance_hasher(*inputs: str | Path) -> Callable[[Path], str | dict[str, str]]:
    """How an ops command gets an input's SHA-256 for its output's provenance: from the registry (--db) for a
    scanned, unchanged file, else hashed. Called first thing, before the command imports torch: the inputs'
    hashing starts at once, in the background (merge asks from a thread, which has no click context)."""
    from adapterzoo.zoo.known_hashes import hash_in_background

    context, stop = click.get_current_context(), threading.Event()
    context.call_on_close(stop.set)  # the command's end ends the hashing, in-process too, as a process exit would
    return hash_in_background(inputs, context.obj["db"], stop)


def use_threads() -> None:
    """Give torch the CPU threads `devices.cpu_threads` decides (from the global --threads, OMP_NUM_THREADS or
    the usable cores). Called by each command that computes with torch, after its hashing has started."""
    from adapterzoo.devices import use_cpu_threads

    use_cpu_threads(click.get_current_context().obj.get("threads"))


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
        from adapterzoo.formats.model.registry import sampled_bases

        BASES = sampled_bases()

        base, sep, path = str(value).partition("=")
        if not sep or base not in BASES:
            self.fail(f"{value!r} is not BASE=CKPT with BASE one of {', '.join(BASES)}", param, ctx)
        if not Path(path).exists():
            self.fail(f"{path}: no such checkpoint", param, ctx)
        return base, Path(path)


class ManyValuesCommand(click.Command):
    """A command whose options in `many_values` take every argument up to the next option
    (`--text-encoders clip_l.safetensors t5xxl.safetensors`), as `multiple=True` options repeated for each."""

    many_values: tuple[str, ...] = ()

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        spread: list[str] = []
        taking = False
        for i, arg in enumerate(args):
            if arg == "--":
                spread += args[i:]
                break
            if arg in self.many_values:
                taking, flag = True, arg
                spread.append(arg)
                continue
            if taking and arg.startswith("-"):
                taking = False
            elif taking and spread[-1] != flag:
                spread.append(flag)
            spread.append(arg)
        return super().parse_args(ctx, spread)


def many_values_command(*flags: str) -> type[click.Command]:
    """A `ManyValuesCommand` class for `flags` (pass as `cls=` to `cli.command`)."""
    return type("ManyValues", (ManyValuesCommand,), {"many_values": flags})


PARTS_OPTIONS = (
    click.option("--pipeline", metavar="DIR", type=click.Path(exists=True, file_okay=False),
                 help="A diffusers folder giving the parts a transformer-only checkpoint lacks (text encoders, "
                      "tokenizers, VAE, scheduler)."),
    click.option("--text-encoders", "text_encoders", metavar="FILE|DIR...", multiple=True,
                 type=click.Path(exists=True),
                 help="Text encoders a transformer-only checkpoint lacks: single files (ComfyUI's clip_l, clip_g, "
                      "t5xxl) or diffusers component folders, each recognised by its tensors. A single file carries no "
                      "tokenizer: CLIP's ships with adapterzoo, any other comes from --pipeline DIR (or the "
                      "tokenizer folder beside a component folder)."),
    click.option("--vae", metavar="FILE", type=click.Path(exists=True),
                 help="The VAE a transformer-only checkpoint lacks: a file in original (LDM) or diffusers names, or a "
                      "diffusers folder."),
)


def parts_options(command: Any) -> Any:
    for option in reversed(PARTS_OPTIONS):
        command = option(command)
    return command


def given_parts(pipeline: str | None, text_encoders: tuple[str, ...], vae: str | None) -> Any:
    from adapterzoo.verify.pipeline_parts import GivenParts

    return GivenParts(Path(pipeline) if pipeline else None, tuple(Path(p) for p in text_encoders),
                      Path(vae) if vae else None)
