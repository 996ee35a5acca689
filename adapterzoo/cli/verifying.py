"""verify and sample: render with adapters applied at run time."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from adapterzoo.cli.group import cli
from adapterzoo.cli.output import emit_json, print_loras, print_table, print_verification
from adapterzoo.cli.params import (
    DEVICE_OPTION,
    CheckpointFor,
    SizeParam,
    WeightedPath,
    given_parts,
    many_values_command,
    parts_options,
    provenance_hasher,
    use_threads,
)
from adapterzoo.formats.model.registry import sampled_bases

VERIFIABLE_KINDS = ["lora", "lycoris", "hypernetwork", "embedding", "vae", "checkpoint"]  # what verify reads


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


def verify_usage(files: tuple[str, ...], registry: bool, checkpoint: str | None, grid: str | None,
                 out_dir: str | None, library_options: dict[str, Any]) -> None:
    """FILE... with --checkpoint, or --registry with --out-dir: the two modes' flags do not mix."""
    if grid and out_dir:
        raise click.UsageError("give -o GRID.png or --out-dir DIR, not both")
    if registry:
        if files:
            raise click.UsageError("give FILE... or --registry, not both")
        if library_options.get("status"):
            if library_options.get("worker"):
                raise click.UsageError("--status shows the queue; --worker works on it: give one")
            return
        if library_options.get("lease") is not None and not library_options.get("worker"):
            raise click.UsageError("--lease is for --worker")
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


def check_grids(files: tuple[str, ...], checkpoint: str | None, grid: str | None, force: bool) -> None:
    """Before anything renders: each -o grid is a .png in an existing folder, no input, replaced only with --force."""
    if grid is None:
        return
    from adapterzoo.formats.io.atomic import check_output

    for file in files:
        check_output(grid_path(grid, None, file, len(files) > 1, lambda _: None), [checkpoint, *files], force,
                     suffix=".png")


@cli.command(cls=many_values_command("--text-encoders"))
@click.argument("files", metavar="[FILE]...", nargs=-1, type=click.Path(exists=True, dir_okay=True))
@click.option("--checkpoint", metavar="CKPT", type=click.Path(exists=True, dir_okay=True),
              help="The checkpoint (single file or diffusers folder) to apply each FILE to.")
@click.option("--registry", is_flag=True, help="Verify the registry's files instead of FILE... (needs --out-dir).")
@click.option("--kind", type=click.Choice(VERIFIABLE_KINDS),
              help="--registry: only this kind (checkpoints, each rendered alone, only when asked for).")
@click.option("--base", type=click.Choice(sampled_bases()), help="--registry: only files for this base.")
@click.option("--unverified", is_flag=True, help="--registry: only files never verified.")
@click.option("--checkpoint-for", "checkpoint_for", metavar="BASE=CKPT", multiple=True, type=CheckpointFor(),
              help="--registry: render BASE's files on CKPT (default: the one indexed checkpoint of BASE).")
@click.option("--worker", is_flag=True,
              help="--registry: one of any number of workers on one registry (PostgreSQL for several machines): "
                   "queue the selection once, then verify jobs from the queue until none is left.")
@click.option("--status", is_flag=True, help="--registry: show the worker queue (queued, running by host, done, "
                                             "failed, rate) and exit.")
@click.option("--lease", type=click.FloatRange(min=1), metavar="S",
              help="--worker: seconds a job stays this worker's without a heartbeat; a dead worker's jobs are "
                   "taken back after it (default 60).")
@click.option("-o", "--output", "grid", metavar="GRID.png", type=click.Path(dir_okay=False),
              help="Write the grid here; with several files, GRID-<file stem>.png each.")
@click.option("--out-dir", metavar="DIR", type=click.Path(file_okay=False),
              help="A grid per file (DIR/<stem>-<sha256[:10]>.png) and DIR/index.html, a contact sheet of them.")
@click.option("--prompt", "prompts", metavar="P", multiple=True,
              help="Prompt (repeatable). Default: 'a photo of a cat'; for an embedding 'a photo of <its token>'.")
@click.option("--seed", "seeds", metavar="S", multiple=True, type=int, help="Seed (repeatable). Default: 0.")
@click.option("--multiplier", "multipliers", metavar="M", multiple=True, type=float,
              help="Grid column (repeatable). Default: 0, 0.5, 1.")
@click.option("--steps", type=click.IntRange(min=1), metavar="N",
              help="Sampling steps. Default: the model's own (4 for a step-distilled model), else 20.")
@click.option("--size", type=SizeParam(), help="Image size. Default: the size the model was trained at.")
@click.option("--quick/--grid", "quick", default=None,
              help="--quick: coverage and effect from one noise prediction per multiplier (no grid, no VAE decode; "
                   "recorded as quick). Default: --quick for --registry on CPU, --grid otherwise.")
@parts_options
@DEVICE_OPTION
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="Default: fp16 on CUDA, else fp32.")
@click.option("--force", is_flag=True, help="Replace an existing -o GRID.png.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per file (a list for several).")
@click.pass_obj
def verify(obj: dict[str, Any], files: tuple[str, ...], checkpoint: str | None, registry: bool, kind: str | None,
           base: str | None, unverified: bool, checkpoint_for: tuple[tuple[str, Path], ...], worker: bool,
           status: bool, lease: float | None, grid: str | None, out_dir: str | None, prompts: tuple[str, ...], seeds: tuple[int, ...], multipliers: tuple[float, ...],
           steps: int | None, size: tuple[int, int] | None, quick: bool | None, pipeline: str | None,
           text_encoders: tuple[str, ...], vae: str | None, device: str, dtype: str | None, force: bool,
           as_json: bool) -> None:
    """Render each FILE on CKPT (or, with --registry, each indexed file on a checkpoint of its base) at several
    multipliers and judge it: pass or fail, with every reason. Each result is stored in the registry; exit
    code 1 when any file fails."""
    verify_usage(files, registry, checkpoint, grid, out_dir,
                 {"kind": kind, "base": base, "unverified": unverified, "checkpoint_for": checkpoint_for,
                  "worker": worker, "status": status, "lease": lease})
    if status:
        show_queue(obj["db"], as_json)
        return
    if quick and grid:
        raise click.UsageError("--quick renders no grid: drop -o")
    check_grids(files, checkpoint, grid, force)
    sha256 = provenance_hasher(*([checkpoint, *files] if checkpoint else []))
    use_threads()
    from adapterzoo.devices import pick_device
    from adapterzoo.verify.verifier import VerifyOptions
    from adapterzoo.zoo.db import open_registry

    if quick is None:  # a library on a CPU: a verdict per file in seconds, grids where they are cheap or asked for
        quick = registry and pick_device(device).type == "cpu"
    options = VerifyOptions(prompts=list(prompts) or None, size=size, device=device, dtype=dtype, quick=quick,
                            steps=steps, parts=given_parts(pipeline, text_encoders, vae))
    options.seeds = list(seeds) or options.seeds
    options.multipliers = list(multipliers) or options.multipliers
    engine = open_registry(obj["db"])
    if registry:
        verify_registry(engine, options, Path(out_dir), sha256, kind, base, unverified, dict(checkpoint_for),
                        as_json, worker, lease)
        return
    from adapterzoo.verify.contact_sheet import write_contact_sheet
    from adapterzoo.verify.pipeline_load import refuse_parts
    from adapterzoo.verify_library import verify_each

    refuse_parts(Path(checkpoint), options.parts)

    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    results = []
    for result in verify_each(engine, Path(checkpoint), [Path(f) for f in files], options, sha256,
                              lambda file: grid_path(grid, out_dir, str(file), len(files) > 1, sha256),
                              keep_going=len(files) > 1 or out_dir is not None):
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
                    base: str | None, unverified: bool, checkpoint_for: dict[str, Path], as_json: bool,
                    worker: bool = False, lease: float | None = None) -> None:
    """`verify --registry` (`--worker`: as one of the queue's workers): a row per file, the summary line, the
    contact sheet; exit 1 unless all passed."""
    if worker:
        from adapterzoo.verify_worker import run_worker

        report = run_worker(engine, options, out_dir, sha256, kind, base, unverified, checkpoint_for,
                            lease_s=lease, progress_bar=not as_json)
    else:
        from adapterzoo.verify_library import verify_library

        report = verify_library(engine, options, out_dir, sha256, kind, base, unverified, checkpoint_for,
                                progress_bar=not as_json)
    if as_json:
        emit_json(report.results)
    else:
        print_table([{**r, "name": Path(r["file"]).name, "why": "; ".join(r["reasons"])} for r in report.results],
                    ["verdict", "kind", "base", "name", "why"])
        click.echo(report.summary())
        if worker:
            from adapterzoo.zoo.verify_queue import queue_status

            click.echo(f"queue: {queue_line(queue_status(engine))}")
        click.echo(f"contact sheet {out_dir / 'index.html'}")
    if any(r["verdict"] != "pass" for r in report.results):
        sys.exit(1)


def queue_line(status: dict[str, Any]) -> str:
    """'3 queued, 2 running, 195 done (190 pass, 5 fail), 0 failed'."""
    return (f"{status['queued']} queued, {status['running']} running, {status['done']} done ({status['pass']} pass, "
            f"{status['fail']} fail), {status['failed']} failed")


def show_queue(db: str | None, as_json: bool) -> None:
    """`verify --registry --status`: the worker queue, by state; running jobs by host; the rate."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.verify_queue import queue_status

    status = queue_status(open_registry(db))
    if as_json:
        emit_json(status)
        return
    hosts = ", ".join(f"{host} {n}" for host, n in sorted(status["running_by_host"].items()))
    if status["lease_ended"]:
        hosts += f" ({status['lease_ended']} lost their worker, to be taken back)"
    print_table([{"state": "queued", "jobs": status["queued"]},
                 {"state": "running", "jobs": status["running"], "detail": hosts},
                 {"state": "done", "jobs": status["done"], "detail": f"{status['pass']} pass, {status['fail']} fail"},
                 {"state": "failed", "jobs": status["failed"], "detail": "a worker died on each twice"}],
                ["state", "jobs", "detail"])
    if status["per_minute"] is not None:
        left = "" if status["seconds_left"] is None else f", about {status['seconds_left'] / 60:.0f} min left"
        click.echo(f"{status['per_minute']:g} files/min over the last 5 min{left}")


@cli.command(cls=many_values_command("--text-encoders"))
@click.option("--checkpoint", metavar="CKPT", required=True, type=click.Path(exists=True, dir_okay=True),
              help="The checkpoint (single file or diffusers folder).")
@click.option("--lora", "loras", metavar="FILE[:W]", multiple=True, type=WeightedPath(),
              help="A LoRA-family file or PEFT folder and its weight (default 1); repeat for more, in order.")
@click.option("--embedding", "embeddings", metavar="FILE[:W]", multiple=True, type=WeightedPath(),
              help="A textual-inversion embedding and its weight (default 1), acting where its token (the file's "
                   "stem, or the diffusers file's own) stands in the prompt or the negative prompt; each slot "
                   "(clip_l, clip_g, t5xxl) on its own text encoder. Repeat for more.")
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
@click.option("--steps", type=click.IntRange(min=1), metavar="N",
              help="Sampling steps. Default: the model's own (4 for a step-distilled model), else 20.")
@click.option("--size", type=SizeParam(), help="Image size. Default: the base's (512, 768, 1024).")
@parts_options
@DEVICE_OPTION
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="Default: fp16 on CUDA, else fp32.")
@click.option("--allow-unmatched", is_flag=True, help="Sample with what fits when LoRA keys land on no module.")
@click.option("--force", is_flag=True, help="Replace OUT.png if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def sample(checkpoint: str, loras: tuple[tuple[str, float], ...], embeddings: tuple[tuple[str, float], ...],
           prompt: str, negative_prompt: str, seed: int,
           dest: str, compose: str, switch_every: int | None, autolora: float | None, steps: int | None,
           size: tuple[int, int] | None, pipeline: str | None, text_encoders: tuple[str, ...], vae: str | None,
           device: str, dtype: str | None,
           allow_unmatched: bool, force: bool,
           as_json: bool) -> None:
    """Render one image from CKPT with several LoRAs composed while sampling (merge, LoRA Switch, LoRA
    Composite, each optionally mixed with the bare model by AutoLoRA's GAMMA). Text-encoder LoRAs act
    merge-style in every mode: the prompt is encoded once, with every LoRA on; so do embeddings."""
    if not loras and not embeddings:
        raise click.UsageError("give --lora FILE[:W] or --embedding FILE[:W] (or both)")
    if not loras and (compose != "merge" or autolora is not None):
        raise click.UsageError("--compose switch|composite and --autolora compose LoRAs: give --lora")
    if switch_every is not None and compose != "switch":
        raise click.UsageError("--switch-every is for --compose switch")
    if autolora is not None and not math.isfinite(autolora):
        raise click.UsageError("--autolora takes a finite number")
    sha256 = provenance_hasher(checkpoint, *(path for path, _ in (*loras, *embeddings)))
    use_threads()
    from adapterzoo.verify.compose import DEFAULT_SWITCH_EVERY, Composition
    from adapterzoo.verify.sample import SampleOptions
    from adapterzoo.verify.sample import sample as render_sample

    composition = Composition(compose, switch_every or DEFAULT_SWITCH_EVERY, autolora)
    options = SampleOptions(prompt, [(Path(path), weight) for path, weight in loras], seed, steps, size,
                            negative_prompt, composition, device, dtype, allow_unmatched,
                            given_parts(pipeline, text_encoders, vae),
                            [(Path(path), weight) for path, weight in embeddings])
    report = render_sample(Path(checkpoint), options, Path(dest), sha256, force=force, progress_bar=not as_json)
    if as_json:
        emit_json(report)
        return
    if report["embeddings"]:
        print_table(report["embeddings"], ["file", "token", "weight", "slots", "slots_hit"])
        for embedding in report["embeddings"]:
            for slot in embedding["unmatched"]:
                click.echo(f"unmatched {Path(embedding['file']).name}: {slot}")
    if report["loras"]:
        print_loras(report, ["file", "weight", "modules", "modules_hit"])
    else:
        for warning in report["warnings"]:
            click.echo(f"warning  {warning}")
    mix = "" if report["autolora"] is None else f", AutoLoRA {report['autolora']:g}"
    click.echo(f"sampled  {report['compose']}{mix}, {report['steps']} steps, seed {report['seed']}, "
               f"{report['size'][0]}x{report['size'][1]} on {report['device']} in {report['seconds']:.1f} s")
    click.echo(f"wrote    {report['output']}")
