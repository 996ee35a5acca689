"""`convert`: probe the input, check the target fits its kind, hand it to that kind's converter."""

from __future__ import annotations

import os
from typing import Any

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.atomic import check_output
from adapterzoo.formats.io.probe_result import with_article
from adapterzoo.formats.model.registry import lora_targets
from adapterzoo.formats.probe import LORA_UNREAD, probe

# DESIGN.md's contract: the formats each kind converts to (a LoRA also to its family's own dialects).
TARGETS: dict[str, tuple[str, ...]] = {
    "lora": lora_targets(),
    "lycoris": lora_targets(),
    "checkpoint": ("ldm", "diffusers"),
    "embedding": ("a1111", "kohya", "diffusers"),
    "hypernetwork": ("safetensors", "a1111"),
}
# Which options mean something for which kind; --force means something for all.
KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "lora": ("base", "rank", "checkpoint"),
    "lycoris": ("base", "rank", "checkpoint"),
    "checkpoint": ("dtype", "prune_ema"),
    "embedding": ("token",),
    "hypernetwork": (),
}


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def convert(src: str | os.PathLike, dest: str | os.PathLike, to: str, **options: Any) -> dict[str, Any]:
    """Convert `src` into format `to` at `dest`; options: force, base, rank, checkpoint, dtype, prune_ema, token.

    `checkpoint` (a LoRA's) resolves its module names against that model's own modules instead of the
    built-in tables of its base, so LoRAs made for non-standard or tiny models convert too.
    """
    force = bool(options.pop("force", False))
    check_output(dest, [src, *([options["checkpoint"]] if options.get("checkpoint") else [])], force)
    found = probe(src)
    kind = found.kind
    if kind not in TARGETS:
        unread = next((w for w in found.warnings if w.startswith(LORA_UNREAD)), None)
        reason = f": {unread}" if unread else f" (convertible: {', '.join(TARGETS)})"
        raise AdapterzooError(f"cannot convert {with_article(kind)} file{reason}")
    if to not in TARGETS[kind]:
        raise AdapterzooError(f"--to {to} does not fit {with_article(kind)}; {with_article(kind)} converts to "
                              f"{' | '.join(TARGETS[kind])}")
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    for option in given:
        if option not in KIND_OPTIONS[kind]:
            raise AdapterzooError(f"{_flag(option)} does not apply to {with_article(kind)}")
    report = _dispatch(kind, src, dest, to, force, given)
    return {"kind": kind, "from": found.format, "to": to, "outputs": _outputs(report, dest), **report}


def _outputs(report: dict[str, Any], dest: str | os.PathLike) -> list[str]:
    """Every path written, whichever way a converter reports them."""
    if "outputs" in report:
        return list(report["outputs"])
    embeddings = report.get("embeddings", {})  # a LoRA's embedded tokens: {token: file written beside it}
    return [str(report.get("output", dest))] + [str(path) for path in embeddings.values()]


def _dispatch(kind: str, src: Any, dest: Any, to: str, force: bool, options: dict[str, Any]) -> dict[str, Any]:
    # Imported here so one converter's heavy imports (or absence) never blocks the others.
    if kind == "embedding":
        from adapterzoo.formats.embedding_convert import convert_embedding

        return convert_embedding(src, dest, to, force=force, **options)
    if kind == "hypernetwork":
        from adapterzoo.formats.hypernetwork_convert import convert_hypernetwork

        return convert_hypernetwork(src, dest, to, force=force)
    if kind == "checkpoint":
        from adapterzoo.formats.checkpoint.checkpoint_convert import convert_checkpoint

        return convert_checkpoint(src, dest, to, dtype=options.get("dtype"),
                                  prune_ema=bool(options.get("prune_ema")), force=force)
    from adapterzoo.formats.lora.lora_convert import convert_lora

    architecture = None
    if options.get("checkpoint"):
        from adapterzoo.formats.checkpoint_targets import check_lora_base, checkpoint_targets

        if options.get("base"):
            raise AdapterzooError("--base and --checkpoint both say what the LoRA is for; give one")
        targets = checkpoint_targets(options["checkpoint"])
        check_lora_base(targets, src)
        architecture = targets.architecture
    return convert_lora(src, dest, to, base=options.get("base"), force=force, rank=options.get("rank"),
                        architecture=architecture)
