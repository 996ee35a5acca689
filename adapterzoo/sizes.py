"""Sizes as people read them, in one format for the CLI's tables and the web page."""

from __future__ import annotations


def human_size(size: int | None) -> str:
    """Bytes in binary units, three figures: 812 B, 1.50 KiB, 144 MiB, 6.46 GiB."""
    if size is None:
        return "-"
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            break
        value /= 1024
    if unit == "B":
        return f"{size} B"
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
