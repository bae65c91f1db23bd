"""One room per idea, imports pointing down: the planner's stages (planner/__init__.py lists them) and serve/'s
(serve/__init__.py) import only their own stage and the ones below, and no module imports itself back through others
(no circle, lazy imports inside functions included). Walks every module's imports with ast, relative ones resolved."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# stage ranks: a module may import modules of its own rank or lower. serve/ ranks above every planner stage.
RANKS = [("planner.cli", 7), ("planner.output", 6), ("planner.planning", 5), ("planner.simulate", 4),
         ("planner.rollout", 4), ("planner.demand", 4), ("planner.placement", 3), ("planner.decisions", 3),
         ("planner.cluster", 2), ("planner.config", 2), ("planner.traffic", 2),
         ("planner.model", 1), ("planner.errors", 0), ("planner.units", 0), ("planner.__main__", 7), ("planner", 0),
         ("serve.run", 13), ("serve.app", 12), ("serve.api", 11), ("serve.engines", 10), ("serve.types", 9),
         ("serve.trace", 9), ("serve", 9)]
# serve/ stages that may not import each other although one ranks above the other: the HTTP API knows no Ray app,
# and the process lifecycle reaches the app only through its import path (a Serve config) and runs no engine
FORBIDDEN = [("serve.api", "serve.app"), ("serve.run", "serve.app"),
             ("serve.run", "serve.engines")]
# the planner's model stage: engines and schemes are registries; a scheme family or an engine unit imports no other
ALLOWED_SIBLINGS = {"planner.model.engines.llamacpp": {"planner.model.engines.llamacpp_offload"},
                    # the simulated engine takes vLLM's bytes and speed numbers: it imitates vLLM
                    "planner.model.engines.sim": {"planner.model.engines.vllm"}}


def rank(module: str) -> int:
    for prefix, r in RANKS:
        if module == prefix or module.startswith(prefix + "."):
            return r
    raise AssertionError(f"{module} is in no stage: add it to RANKS and to its package's list")


def modules(top: str = "planner"):
    for d, _, files in os.walk(os.path.join(ROOT, top)):
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


def ours(target: str) -> bool:
    return target.split(".")[0] in ("planner", "serve")


def graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (names imported from a package resolved to the package's module)."""
    mods = {m: (p, pkg) for top in ("planner", "serve") for p, m, pkg in modules(top)}
    out: dict[str, set[str]] = {}
    for m, (path, pkg) in mods.items():
        deps = set()
        for t in imports(path, m, pkg):
            if not ours(t):
                continue
            while t and t not in mods:  # `planner.model.quant.SCHEMES` -> planner.model.quant
                t = t.rpartition(".")[0]
            if t and t != m:
                deps.add(t)
        out[m] = deps
    return out


def test_stages_import_downwards_only():
    bad = []
    for top in ("planner", "serve"):
        for path, mod, is_pkg in modules(top):
            me = rank(mod)
            for target in imports(path, mod, is_pkg):
                if not ours(target):
                    continue
                try:
                    r = rank(target)
                except AssertionError:
                    continue  # a name imported from a package (``from planner.model import training``): as such
                if r > me:
                    bad.append(f"{mod} (stage {me}) imports {target} (stage {r})")
                for a, b in FORBIDDEN:
                    if (mod == a or mod.startswith(a + ".")) and (target == b or target.startswith(b + ".")):
                        bad.append(f"{mod} imports {target}: {a} may not import {b}")
    assert not bad, "\n".join(bad)


def test_the_planner_imports_nothing_of_serve():
    g = graph()
    bad = [f"{m} imports {d}" for m, deps in g.items() if m.startswith("planner") for d in deps
           if d.startswith("serve")]
    assert not bad, "\n".join(bad)


def test_engine_and_scheme_units_stand_alone():
    """An engine module or a scheme family imports no other engine or family (the registry imports them all)."""
    g = graph()
    bad = []
    for pkg in ("planner.model.engines", "planner.model.quant", "serve.engines"):
        for m, deps in g.items():
            if not m.startswith(pkg + "."):
                continue
            for d in deps:
                sibling = d.startswith(pkg + ".") and d not in (f"{pkg}.types", f"{pkg}.base", f"{pkg}.batching",
                                                                 f"{pkg}.loader", f"{pkg}.memory_probe")
                if sibling and d not in ALLOWED_SIBLINGS.get(m, ()):
                    bad.append(f"{m} imports its sibling {d}")
    assert not bad, "\n".join(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    """No module reaches itself through imports, lazy ones inside functions included. A package that re-exports its
    modules counts as importing them, so a module importing its own package's __init__ is a circle too."""
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_module_is_in_a_stage():
    for top in ("planner", "serve"):
        for _, mod, _ in modules(top):
            rank(mod)


def test_a_violation_is_caught(tmp_path):
    """The checks themselves: a model module importing placement is reported, and so is a circle of two."""
    p = tmp_path / "x.py"
    p.write_text("from planner.placement.packing import plan\n")
    found = [t for t in imports(str(p), "planner.model.x", False) if ours(t)]
    assert any(rank(t) > rank("planner.model.x") for t in found)
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_engine_of_the_registry_has_its_two_modules():
    """An engine is its planner module (estimate, settings, describe) and its serve module (start), found by name:
    adding one is those two files and its line in the registry."""
    from planner.model.engines import ENGINES
    from serve.engines import module_of

    for name, unit in ENGINES.items():
        assert unit.NAME == name and all(callable(getattr(unit, f, None)) for f in (
            "estimate", "settings", "describe", "auto_takes", "cannot_run")), name
        assert isinstance(unit.LABEL, str) and hasattr(unit, "INSTALL_HINT"), name
        if unit.INSTALL_HINT:
            assert isinstance(unit.AUTO_MISSING, str), name
        path = os.path.join(ROOT, *module_of(name).split(".")) + ".py"
        tree = ast.parse(open(path, encoding="utf-8").read())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "start" for n in tree.body), f"{path} has no start()"
