"""The arrows between rooms (DESIGN.md) and between the folders of formats/ point one way only (issue 11 §4).

Every import in the package, lazy ones inside functions included, is read with `ast`, so a new module
that imports upward or closes a circle fails here before a reviewer has to spot it.
"""

from __future__ import annotations

import ast
import graphlib
import re
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


# -- families are plug-ins (issue 17 §0) ---------------------------------------------------------------------
#
# A module outside formats/families/ *names a family* when
#   1. it imports anything under adapterzoo.formats.families (only formats.model.registry finds families), or
#   2. an identifier it binds or reads (variable, attribute, function, class, parameter, import alias) has a
#      family word as one of its parts, split at underscores and at lower-to-upper case steps
#      (FLUX_CLASS, FluxArchitecture, is_sdxl), or
#   3. a string constant other than a docstring has a family word as one of its words, split at anything but
#      letters and digits and at lower-to-upper case steps ("flux", "SDXL 1.0", "FluxPipeline").
# Family words are the bases the registered families declare (sd1, sd2, sdxl, sd3, flux, ...), read from the
# registry, so a family added later extends the rule by itself. Comments and docstrings may name families.

FAMILY_PACKAGE = "adapterzoo.formats.families"
# The few modules that may name families anyway, and why.
NAMES_FAMILIES = {
    "adapterzoo.tiny_models": "builds the tiny SD1/SD2/SDXL pipelines the tests and the demo run on",
    "adapterzoo.demo": "the tour is told on a tiny SD1 model",
    "adapterzoo.demo_library": "the tour's library is built from a tiny SD1 model",
}


def family_words() -> set[str]:
    from adapterzoo.formats.model.registry import bases

    return {base.lower() for base in bases()}


def _parts(text: str) -> set[str]:
    """Words of an identifier or a string: split at non-alphanumerics and at lower-to-upper case steps."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", text)
    return {word.lower() for word in re.split(r"[^A-Za-z0-9]+", spaced) if word}


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def family_names_in(source: str, module: str, words: set[str]) -> list[str]:
    """What in `source` (module `module`) names a family, one line per finding."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    package = module if module.endswith("__init__") else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        where = f"{module}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            imported = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            imported = [f"{base}.{alias.name}" for alias in node.names]
        else:
            imported = []
        found += [f"{where} imports {name}" for name in imported if name.startswith(FAMILY_PACKAGE + ".")]
        names = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.alias):
            names = [node.asname or node.name]
        elif isinstance(node, ast.keyword) and node.arg:
            names = [node.arg]
        found += [f"{where} identifier {name}" for name in names if _parts(name) & words]
        is_string = isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        if is_string and _parts(node.value) & words:
            found.append(f"{where} string {node.value[:60]!r}")
    return found


def test_no_module_outside_a_family_names_a_family() -> None:
    words = family_words()
    assert {"sd1", "sd2", "sdxl", "sd3", "flux"} <= words
    found = []
    for path in sources(PACKAGE):
        module = module_name(path)
        if module.startswith(FAMILY_PACKAGE) or module in NAMES_FAMILIES:
            continue
        found += family_names_in(path.read_text(encoding="utf-8"), module, words)
    assert not found, "modules outside formats/families/ name a family:\n" + "\n".join(found)


def test_the_family_rule_catches_each_way_of_naming_one() -> None:
    planted = '''"""Docstrings may say Flux and SDXL."""
from adapterzoo.formats.families.flux import probe  # 1: a family module imported past the registry
from adapterzoo.formats.model.registry import family_of

SDXL_WIDTH = 1280  # 2: an identifier


def pick(base, loraFluxOnly=False):
    """Comments and docstrings are free: flux, sd1."""
    if base == "flux":  # 3: a string
        return f"the {base} model"
    return family_of(base).title + " SD3 pipelines"
'''
    found = family_names_in(planted, "adapterzoo.ops.planted", family_words())
    assert any("imports adapterzoo.formats.families.flux" in f for f in found)
    assert any("identifier SDXL_WIDTH" in f for f in found)
    assert any("identifier loraFluxOnly" in f for f in found)
    assert any("string 'flux'" in f for f in found)
    assert any("SD3 pipelines" in f for f in found)
    assert len(found) == 5  # nothing else: `probe`, `family_of`, the f-string's `base` name no family
    clean = '"""Flux and SDXL in a docstring."""\nfrom adapterzoo.formats.model.registry import families\nx = "fluxion sd10"\n'
    assert family_names_in(clean, "adapterzoo.ops.clean", family_words()) == []


def test_formats_modules_form_no_circle_even_through_family_discovery() -> None:
    """The registry imports every family when it lists them; counted as imports, no circle may pass through."""
    edges = {here: {n for n in names if n.startswith("adapterzoo.formats")} for here, names in formats_imports().items()}
    discovered = {module_name(p) for p in (FORMATS / "families").iterdir()
                  if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert {"adapterzoo.formats.families.sd", "adapterzoo.formats.families.flux"} <= discovered
    edges["adapterzoo.formats.model.registry"] |= discovered
    try:
        tuple(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"formats/ modules import each other in a circle: {' -> '.join(error.args[1])}")
