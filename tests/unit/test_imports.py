"""Imports run one way: science library <- plumbing <- services <- application (issue #13).

Layers (a module may import its own package or a lower layer, never a higher one, and a
service never imports another service):

0. ``maskprop``: the science. Third-party imports: the standard library plus numpy, scipy,
   sklearn, fastcluster, faiss and threadpoolctl. ``pycocotools`` and ``PIL`` are allowed
   under ``maskprop.data`` only: COCO masks (RLE, mask AP) and scene rendering are what that
   subpackage is for.
   Nothing else: no typer, tqdm, matplotlib, kafka, redis, grpc, fastapi, torch, pandas,
   pydantic.
1. ``maskprop_runtime``: the plumbing (bus, loop, store, settings, ...).
2. the services' packages ``maskprop_detector``, ``maskprop_clusterer``, ``maskprop_search``,
   ``maskprop_sink``, ``maskprop_gateway``: none imports another.
3. ``maskprop_app``: the CLI, the embedded runner, the demo, the plots.

Every import counts: top-level and lazy ones inside functions (or under ``TYPE_CHECKING``),
``import x`` and ``from x import y``, relative imports resolved, and
``importlib.import_module("x")`` with a literal name. The one exception is the entry point
``src/maskprop/__main__.py`` (``python -m maskprop`` runs the application's CLI; no library
code imports it). The generated protobuf stubs (``maskprop_runtime/pb``) are not walked.

``pytest tests/unit/test_imports.py -s`` prints the package import graph.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SERVICES = (
    "maskprop_detector",
    "maskprop_clusterer",
    "maskprop_search",
    "maskprop_sink",
    "maskprop_gateway",
    "maskprop_controller",
)
LAYER = {
    "maskprop": 0,
    "maskprop_runtime": 1,
    **dict.fromkeys(SERVICES, 2),
    "maskprop_app": 3,
}
# _fastcluster: fastcluster's C extension, which tree.py calls directly for its linkage
# faiss: k-means blocks of tree.py's two-level tree (imported only when one is built)
# threadpoolctl: one BLAS thread in each of tree.py's pooled block workers
SCIENCE_THIRD_PARTY = {
    "numpy", "scipy", "sklearn", "fastcluster", "_fastcluster", "faiss", "threadpoolctl",
}  # fmt: skip
DATA_THIRD_PARTY = {"pycocotools", "PIL"}  # under maskprop.data only (COCO masks, rendering)
ENTRY_POINT_EXCEPTIONS = {("src/maskprop/__main__.py", "maskprop_app")}
GENERATED = "src/maskprop_runtime/pb"


@dataclass(frozen=True)
class Import:
    """One import statement: ``path:line`` of the importing file, the importing module and
    the absolute dotted name it imports (``from a.b import c`` gives ``a.b``)."""

    path: str
    line: int
    module: str
    target: str

    @property
    def package(self) -> str:
        return self.module.split(".")[0]

    @property
    def target_package(self) -> str:
        return self.target.split(".")[0]

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_name(root: Path, file: Path) -> tuple[str, bool]:
    """Dotted module name of ``file`` under the import root ``root``, and whether it is a
    package's ``__init__``."""
    parts = list(file.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def imports_in(source: str, module: str, is_package: bool, path: str) -> list[Import]:
    """Every import in ``source`` (the code of ``module``), lazy ones included, with
    relative imports made absolute."""
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, module, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]  # a module's relative imports start at its package
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append(Import(path, node.lineno, module, target))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(path, node.lineno, module, node.args[0].value))
    return found


def source_files() -> list[tuple[Path, Path]]:
    """(import root, file) of every first-party ``.py`` under src/ and services/*/."""
    roots = [ROOT / "src", *sorted(p for p in (ROOT / "services").iterdir() if p.is_dir())]
    out = []
    for root in roots:
        for file in sorted(root.rglob("*.py")):
            rel = file.relative_to(ROOT).as_posix()
            if rel.startswith(GENERATED + "/") or file.relative_to(root).parts[0] not in LAYER:
                continue
            out.append((root, file))
    return out


def all_imports() -> list[Import]:
    found = []
    for root, file in source_files():
        module, is_package = module_name(root, file)
        rel = file.relative_to(ROOT).as_posix()
        found += imports_in(file.read_text(), module, is_package, rel)
    return found


def violation(imp: Import) -> str | None:
    """Why ``imp`` breaks the layering, or None when it is allowed."""
    own, target = imp.package, imp.target_package
    if (imp.path, target) in ENTRY_POINT_EXCEPTIONS:
        return None
    if target in LAYER:
        if target == own:
            return None
        if LAYER[target] > LAYER[own]:
            return f"{own} (layer {LAYER[own]}) imports {imp.target} (layer {LAYER[target]}): up"
        if LAYER[target] == LAYER[own]:
            return f"{own} imports {imp.target}: one service imports another"
        return None
    if own != "maskprop" or target in sys.stdlib_module_names or target in SCIENCE_THIRD_PARTY:
        return None
    if target in DATA_THIRD_PARTY and imp.module.startswith("maskprop.data."):
        return None
    return f"the science library imports {imp.target}"


def import_graph(imports: list[Import]) -> dict[str, set[str]]:
    """package -> the first-party packages it imports (itself left out); for ``maskprop``
    also its third-party imports, marked ``(3rd)``."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        own, target = imp.package, imp.target_package
        graph[own]
        if (imp.path, target) in ENTRY_POINT_EXCEPTIONS:
            graph[own].add(f"{target} (entry point)")
        elif target in LAYER and target != own:
            graph[own].add(target)
        elif own == "maskprop" and target not in LAYER and target not in sys.stdlib_module_names:
            graph[own].add(f"{target} (3rd)")
    return graph


def format_graph(graph: dict[str, set[str]], imports: list[Import]) -> str:
    bad = {(i.package, i.target_package) for i in imports if violation(i) is not None}
    lines = ["package import graph (layer: package -> imports; ! marks a violation)"]
    for own in sorted(graph, key=lambda p: (LAYER[p], p)):
        targets = sorted(graph[own], key=lambda t: (LAYER.get(t, -1), t))
        shown = [f"{t}{' !' if (own, t) in bad else ''}" for t in targets]
        lines.append(f"  {LAYER[own]}: {own} -> {', '.join(shown) or '(nothing)'}")
    return "\n".join(lines)


def test_imports_run_one_way() -> None:
    imports = all_imports()
    assert {i.package for i in imports} >= set(LAYER)  # every layer was found and walked
    print("\n" + format_graph(import_graph(imports), imports))
    problems = [f"{i.where()}: {why}" for i in imports if (why := violation(i)) is not None]
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_lazy_relative_and_literal_imports_are_seen() -> None:
    source = (
        "import os\n"
        "from . import sibling\n"
        "from ..runtime import bus\n"
        "def f():\n"
        "    import typer\n"
        "    importlib.import_module('maskprop_app.cli')\n"
    )
    found = imports_in(source, "maskprop.sub.mod", False, "x.py")
    assert [(i.line, i.target) for i in found] == [
        (1, "os"),
        (2, "maskprop.sub"),
        (3, "maskprop.runtime"),
        (5, "typer"),
        (6, "maskprop_app.cli"),
    ]
    in_init = imports_in("from .a import b\n", "maskprop.sub", True, "x.py")
    assert in_init[0].target == "maskprop.sub.a"


def test_the_rules_flag_what_they_should() -> None:
    def why(path: str, module: str, target: str) -> str | None:
        return violation(Import(path, 1, module, target))

    assert why("src/maskprop/tree.py", "maskprop.tree", "typer") is not None
    assert why("src/maskprop/tree.py", "maskprop.tree", "maskprop_runtime.bus") is not None
    assert why("src/maskprop/tree.py", "maskprop.tree", "numpy") is None
    assert why("src/maskprop/tree.py", "maskprop.tree", "pycocotools.mask") is not None
    assert why("src/maskprop/data/coco.py", "maskprop.data.coco", "pycocotools.mask") is None
    assert why("s/maskprop_search/core.py", "maskprop_search.core", "maskprop_sink.x") is not None
    assert why("s/maskprop_search/core.py", "maskprop_search.core", "maskprop_app.cli") is not None
    assert why("s/maskprop_search/core.py", "maskprop_search.core", "redis") is None
    assert why("src/maskprop_app/cli.py", "maskprop_app.cli", "maskprop_search.core") is None
    assert why("src/maskprop/__main__.py", "maskprop.__main__", "maskprop_app.cli") is None
