"""How numbers read on the page: sizes in binary units, ratios as percents, dates without microseconds."""

from __future__ import annotations

from typing import Any

from adapterzoo.sizes import human_size


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def day(value: str | None) -> str:
    """'2026-03-01T12:30:00.123' -> '2026-03-01 12:30'."""
    return "-" if not value else value.replace("T", " ")[:16]


FILTERS = {"human_size": human_size, "percent": percent, "number": number, "day": day}
