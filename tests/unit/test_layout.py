"""The planner's stages import downwards only (planner/__init__.py lists them): a module of one stage never imports
a later stage. Walks every module's imports with ast, relative ones resolved."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLANNER = os.path.join(ROOT, "planner")

# stage ranks: a module may import modules of its own rank or lower
RANKS = [("planner.cli", 6), ("planner.output", 5), ("planner.planning", 4), ("planner.placement", 3),
         ("planner.decisions", 3), ("planner.cluster", 2), ("planner.model", 1), ("planner.config", 0),
         ("planner.errors", 0), ("planner.units", 0), ("planner.__main__", 6), ("planner", 0)]


def rank(module: str) -> int:
    for prefix, r in RANKS:
        if module == prefix or module.startswith(prefix + "."):
            return r
    raise AssertionError(f"{module} is in no stage: add it to RANKS and to planner/__init__.py's list")


def modules():
    for d, _, files in os.walk(PLANNER):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield path, mod.removesuffix(".__init__"), f == "__init__.py"


def imports(path: str, mod: str, is_pkg: bool):
    tree = ast.parse(open(path, encoding="utf-8").read())
    pkg = mod if is_pkg else mod.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            for a in node.names:  # `from planner import cli` imports planner.cli
                yield f"{target}.{a.name}"


def test_stages_import_downwards_only():
    bad = []
    for path, mod, is_pkg in modules():
        me = rank(mod)
        for target in imports(path, mod, is_pkg):
            if not target.startswith("planner"):
                continue
            try:
                r = rank(target)
            except AssertionError:
                continue  # a name imported from a package (``from planner.model import training``): checked as such
            if r > me:
                bad.append(f"{mod} (stage {me}) imports {target} (stage {r})")
    assert not bad, "\n".join(bad)


def test_every_module_is_in_a_stage():
    for _, mod, _ in modules():
        rank(mod)


def test_a_violation_is_caught(tmp_path):
    """The check itself: a model module importing placement is reported."""
    p = tmp_path / "x.py"
    p.write_text("from planner.placement.packing import plan\n")
    found = [t for t in imports(str(p), "planner.model.x", False) if t.startswith("planner")]
    assert any(rank(t) > rank("planner.model.x") for t in found)
