"""How commands print: aligned tables for people, JSON for scripts, the shared report layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def print_table(rows: list[dict[str, Any]], columns: list[str], wide: set[str] | frozenset[str] = frozenset()) -> None:
    """Plain aligned columns; long values are cut so a row stays on one line, except in the `wide` columns
    (a path cut short names nothing)."""
    if not rows:
        click.echo("(nothing)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c)))[:None if c in wide else 60] for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def describe_location(location: dict[str, Any]) -> str:
    """One line for `show`: where a copy is, on which host, in which root, and whether it is still there."""
    host = "shared" if location["host"] == "*" else location["host"]
    root = location["root"]
    parts = [f"{host}  {location['path']}"]
    if root is not None:
        parts.append(f"(root {root['id']}: {root['layout']}{' ' + root['kind'] if root['kind'] else ''})")
    if location["missing"]:
        parts.append(f"MISSING since {location['missing_since'] or '?'}")
    elif not location["here"]:
        parts.append("(another host)")
    return "  ".join(parts)


def describe_event(event: dict[str, Any]) -> str:
    """One line of a file's history: when, what, where from and to."""
    when = str(event["created"])[:19]
    state = "" if event["state"] == "done" else f" ({event['state']})"
    where = event["path"] or ""
    if event["new_path"] and event["new_path"] != event["path"]:
        where = f"{where} -> {event['new_path']}"
    return f"{when}  {event['action']}{state}  {where}".rstrip()


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


def describe_source(source: dict[str, Any]) -> str:
    """One line for `show`: where the file came from and what the source says it is."""
    model = f"model {source['civitai_model_id']} " if source["civitai_model_id"] else ""  # from a mirror: none yet
    where = {"civitai": f"civitai {model}version {source['civitai_version_id']}",
             "hf": f"hf {source['hf_repo']}/{source['hf_path']}@{source['hf_revision']}"}.get(
        source["provider"], source["download_url"] or source["provider"])
    parts = [where, " / ".join(n for n in (source["model_name"], source["version_name"]) if n)]
    if source["base_stated"]:
        parts.append(f"base {source['base_stated']}")
    if source["trained_words"]:
        parts.append("words " + ", ".join(source["trained_words"]))
    return "; ".join(p for p in parts if p)


def print_verification(result: dict[str, Any]) -> None:
    coverage = result["coverage"]
    quick = ", quick" if result.get("quick") else ""
    click.echo(f"{result['verdict'].upper()}  {result['file']}  ({result['kind'] or '-'}, {result['format'] or '-'}, "
               f"{result['base'] or '-'}; {result['seconds']:.1f} s{quick})")
    if coverage is not None:
        click.echo(f"  coverage  {coverage['keys_matched']}/{coverage['keys_total']} keys, "
                   f"{coverage['modules_hit']}/{coverage['modules_total']} modules ran")
    for effect in result["effects"]:
        noise, pixels = effect["noise_pred_rel_change"], effect["mean_abs_pixel_change"]
        measured = ([] if pixels is None else [f"pixels {pixels:.3f}/255"]) + \
            ([] if noise is None else [f"noise prediction {noise:.2%}"])
        click.echo(f"  m = {effect['multiplier']:<6g} {', '.join(measured)}")
    for reason in result["reasons"]:
        click.echo(f"  - {reason}")
    if result["grid"]:
        click.echo(f"  grid      {result['grid']}")
