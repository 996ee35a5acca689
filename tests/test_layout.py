"""The arrows between rooms (DESIGN.md) and between the folders of formats/ point one way only (issue 11 §4).

Every import in the package, lazy ones inside functions included, is read with `ast`, so a new module
that imports upward or closes a circle fails here before a reviewer has to spot it.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "adapterzoo"
FORMATS = PACKAGE / "formats"
ROOMS = ("formats", "ops", "verify", "zoo")
# Modules next to the rooms that every room may use: they import no room themselves.
SHARED = {"adapterzoo", "adapterzoo.errors", "adapterzoo.devices", "adapterzoo.tiny_models"}
# What each room must never import (DESIGN.md: cli -> zoo, ops, verify -> formats; zoo may use formats).
FORBIDDEN = {
    "formats": {"ops", "verify", "zoo", "front"},
    "ops": {"verify", "zoo", "front"},
    "verify": {"ops", "zoo", "front"},
    "zoo": {"ops", "verify", "front"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every adapterzoo module `path` imports; `from pkg import name` counts as pkg.name when that is a module."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if is_module(full) else base)
    return {name for name in found if name == "adapterzoo" or name.startswith("adapterzoo.")}


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def room(name: str) -> str:
    """formats, ops, verify, zoo, shared, or front (cli, demo and the other callers of rooms)."""
    if name in SHARED:
        return "shared"
    parts = name.split(".")
    return parts[1] if parts[1] in ROOMS else "front"


def formats_folder(name: str) -> str:
    """The subpackage of formats/ a module lives in, or "top" for probe.py, convert.py and their peers."""
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and (FORMATS / parts[2]).is_dir() else "top"


def sources(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def formats_imports() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in sources(FORMATS)}


def test_the_reader_sees_lazy_and_from_package_imports() -> None:
    convert = imported_modules(FORMATS / "convert.py")
    assert "adapterzoo.formats.probe" in convert
    assert "adapterzoo.formats.lora.lora_convert" in convert  # imported inside a function
    assert formats_folder("adapterzoo.formats.lora.lora_read") == "lora"
    assert formats_folder("adapterzoo.formats.lora") == "lora"
    assert formats_folder("adapterzoo.formats.probe") == "top"
    assert room("adapterzoo.cli") == "front" and room("adapterzoo.errors") == "shared"


def test_rooms_import_only_downward() -> None:
    wrong = {}
    for path in sources(PACKAGE):
        here = module_name(path)
        banned = FORBIDDEN.get(room(here), set())
        if names := sorted(name for name in imported_modules(path) if room(name) in banned):
            wrong[here] = names
    assert not wrong, f"imports against DESIGN.md's arrows (cli -> zoo, ops, verify -> formats): {wrong}"


FACES = ("cli", "web")  # DESIGN.md: cli, web -> zoo, ops, verify -> formats; views.py is their one serializer


def face(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FACES else None


def test_web_is_a_second_face_beside_cli_that_nothing_below_imports() -> None:
    """web and cli never import each other, except that the `serve` command starts the server; no room and
    not views.py imports either face (views.py serves both)."""
    wrong = {}
    for path in sources(PACKAGE):
        here = module_name(path)
        names = imported_modules(path)
        if face(here) == "web":
            bad = [n for n in names if face(n) == "cli"]
        elif face(here) == "cli":
            bad = [n for n in names if face(n) == "web" and not (here == "adapterzoo.cli.serve"
                                                                   and n == "adapterzoo.web.server")]
        elif here == "adapterzoo.__main__":  # `python -m adapterzoo` is the command line
            bad = [n for n in names if face(n) == "web"]
        else:
            bad = [n for n in names if face(n)]
        if bad:
            wrong[here] = sorted(bad)
    assert not wrong, f"imports across the faces (cli, web) or up into them: {wrong}"
    assert "adapterzoo.views" in imported_modules(PACKAGE / "cli" / "registry.py")
    assert "adapterzoo.views" in imported_modules(PACKAGE / "web" / "api.py")


def test_no_formats_subpackage_imports_the_dispatcher_level_above_it() -> None:
    upward = {
        here: sorted(
            name for name in names if name.startswith("adapterzoo.formats") and formats_folder(name) == "top"
        )
        for here, names in formats_imports().items()
        if formats_folder(here) != "top"
    }
    upward = {here: names for here, names in upward.items() if names}
    assert not upward, f"modules in formats/ subpackages import the level above them: {upward}"


def test_formats_subpackages_form_no_circle() -> None:
    edges: dict[str, set[str]] = {}
    for here, names in formats_imports().items():
        for name in names:
            if name.startswith("adapterzoo.formats.") and formats_folder(name) != formats_folder(here):
                edges.setdefault(formats_folder(here), set()).add(formats_folder(name))
    assert edges.get("top"), "probe.py and convert.py should use the subpackages"
    try:
        tuple(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"formats/ subpackages import each other in a circle: {' -> '.join(error.args[1])}")
