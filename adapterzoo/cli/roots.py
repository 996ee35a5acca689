"""roots: the folders a bare `scan` rescans, added by hand or read from a UI's config; shared ones per host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterzoo.cli.group import cli
from adapterzoo.cli.output import emit_json, print_table
from adapterzoo.formats.io.probe_result import KINDS
from adapterzoo.sizes import human_size

LAYOUT_CHOICE = click.Choice(["a1111", "comfyui", "invoke", "plain"])


class MountParam(click.ParamType):
    """HOST=PATH: where another host mounts a shared root."""

    name = "HOST=PATH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        host, sep, path = str(value).partition("=")
        if not (sep and host.strip() and path.strip()):
            self.fail(f"{value!r} is not HOST=PATH", param, ctx)
        return host.strip(), path.strip()


@cli.group()
def roots() -> None:
    """The folders a bare `adapterzoo scan` rescans: UI installs and model folders, this host's or shared."""


@roots.command("add")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--layout", type=LAYOUT_CHOICE, help="The UI whose folder it is (default: guessed from what is in it, "
              "else plain).")
@click.option("--kind", type=click.Choice([k for k in KINDS if k != "unknown"]),
              help="The one kind of model it holds (a UI's LoRA folder); none: a whole install or a mix.")
@click.option("--shared", is_flag=True, help="A storage several hosts mount (a NAS): its files are known once, at "
              "their path on every host that mounts it.")
@click.option("--mount", "mounts", metavar="HOST=PATH", multiple=True, type=MountParam(),
              help="--shared: where another host mounts it (repeatable; each host can also say so itself with "
              "`roots mount`).")
@click.option("--json", "as_json", is_flag=True, help="Print the root as JSON.")
@click.pass_obj
def roots_add(obj: dict[str, Any], path: str, layout: str | None, kind: str | None, shared: bool,
              mounts: tuple[tuple[str, str], ...], as_json: bool) -> None:
    """Add PATH as a root of this host (ADAPTERZOO_HOST), or as a shared root this host mounts at PATH."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.roots import add_root

    if mounts and not shared:
        raise click.UsageError("--mount goes with --shared")
    change = add_root(open_registry(obj["db"]), path, layout, kind, None, shared, dict(mounts))
    print_change(change.to_json(), as_json)


@roots.command("mount")
@click.argument("root", metavar="ROOT")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--host", metavar="H", help="The host that mounts it there (default: this one).")
@click.option("--json", "as_json", is_flag=True, help="Print the root as JSON.")
@click.pass_obj
def roots_mount(obj: dict[str, Any], root: str, path: str, host: str | None, as_json: bool) -> None:
    """Say that shared ROOT (its id or path) is at PATH on this host (or --host H)."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.roots import mount_root

    print_change(mount_root(open_registry(obj["db"]), root, path, host).to_json(), as_json)


@roots.command("remove")
@click.argument("root", metavar="ID|PATH")
@click.option("--json", "as_json", is_flag=True, help="Print the root as JSON.")
@click.pass_obj
def roots_remove(obj: dict[str, Any], root: str, as_json: bool) -> None:
    """Stop rescanning a root (its files stay in the registry; nothing on disk changes). A shared root is
    unmounted from this host only, unless no other host mounts it."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.roots import remove_root

    print_change(remove_root(open_registry(obj["db"]), root).to_json(), as_json)


@roots.command("list")
@click.option("--all-hosts", "every_host", is_flag=True, help="Every host's roots, not only this one's and the "
              "shared ones.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def roots_list(obj: dict[str, Any], every_host: bool, as_json: bool) -> None:
    """The roots, with how many files the registry knows in each and their size."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.roots import list_roots

    rows = list_roots(open_registry(obj["db"]), every_host)
    if as_json:
        emit_json(rows)
        return
    print_table([{**r, "host": "shared" if r["shared"] else r["host"], "kind": r["kind"] or "-",
                  "size": human_size(r["bytes"]),
                  "path": r["path"] if r["here"] else f"{r['path']} (not mounted here)",
                  "state": "ok" if r["exists"] else "not found" if r["here"] else "-"} for r in rows],
                ["id", "host", "layout", "kind", "files", "size", "state", "path"], wide={"path"})


@roots.command("import")
@click.argument("configs", metavar="FILE|DIR...", nargs=-1, type=click.Path(exists=True))
@click.option("--a1111-args", "a1111_args", metavar="ARGS",
              help="An A1111/Forge command line (--ckpt-dir ... --lora-dir ...); relative folders are the current "
              "folder's.")
@click.option("--dry-run", is_flag=True, help="Say what would be added; add nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per folder.")
@click.pass_obj
def roots_import(obj: dict[str, Any], configs: tuple[str, ...], a1111_args: str | None, dry_run: bool,
                 as_json: bool) -> None:
    """Add the model folders a UI is configured with: ComfyUI's extra_model_paths.yaml (every section),
    A1111/Forge's webui-user.sh/.bat (--ckpt-dir, --lora-dir, --embeddings-dir, --hypernetwork-dir, ...),
    InvokeAI's invokeai.yaml (models_dir). A DIR is searched for those files. Folders that do not exist are
    reported, not added."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.root_import import a1111_roots, read_config
    from adapterzoo.zoo.roots import add_root

    if not configs and not a1111_args:
        raise click.UsageError("say what to read: FILE|DIR..., or --a1111-args ARGS")
    specs = [spec for config in configs for spec in read_config(Path(config))]
    specs += a1111_roots(a1111_args, None) if a1111_args else []
    engine = None if dry_run else open_registry(obj["db"])
    rows = []
    for spec in specs:
        row = {"path": spec.path, "layout": spec.layout, "kind": spec.kind, "label": spec.label}
        if not Path(spec.path).is_dir():
            rows.append({**row, "status": "not found"})
        elif engine is None:
            rows.append({**row, "status": "would add"})
        else:
            change = add_root(engine, spec.path, spec.layout, spec.kind, spec.label)
            rows.append({**change.to_json(), "status": change.status})
    if as_json:
        emit_json(rows)
        return
    print_table([{**r, "kind": r["kind"] or "-"} for r in rows], ["status", "layout", "kind", "path", "label"],
                wide={"path", "label"})


def print_change(change: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(change)
        return
    where = "shared" if change["shared"] else change["host"]
    kind = f" {change['kind']}" if change["kind"] else ""
    moved = f"; {change['locations']} known locations now under it" if change["locations"] else ""
    click.echo(f"{change['status']:9} root {change['id']} ({where}, {change['layout']}{kind}) {change['path']}{moved}")
