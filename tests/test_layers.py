"""The package's layering (docs/concepts.md, "Architecture"): a module imports only
from its own layer or the layers below, the imports between the package's modules form
no cycle, and no module imports another of the package from inside a function."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "triqdef"

# module (dotted, relative to triqdef) -> layer; a package's modules share its layer
LAYERS = {
    "errors": 1,
    "_checks": 1,
    "_guard": 1,
    "_maps": 2,
    "functional": 2,
    "hog": 2,
    "quant": 2,
    "_bnstats": 2,
    "taps": 2,
    "patches": 2,
    "_safetensors": 2,
    "_export": 2,
    "_onnx_integer": 2,
    "_statedict": 2,
    "losses": 3,
    "_terms": 4,
    "_replay": 4,
    "objective": 4,
    "_multibit": 5,
    "wrapper": 5,
    "io": 6,
    "export": 6,
    "onnx_export": 6,
    "schedule": 6,
    "attacks": 7,
    "evaluate": 7,
    "baselines": 7,
    "models": 7,
    "data": 7,
    "integrations": 8,  # framework glue; the core never imports it
    "reproduce": 8,  # the paper's experiment, on the layers below
    "cli": 9,  # the command line
    "__main__": 9,  # python -m triqdef
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Dotted names (relative to triqdef) that ``node`` imports from the package."""
    if node.level == 0:
        mod = node.module or ""
        if not mod.startswith("triqdef"):
            return []
        base = mod[len("triqdef.") :] if mod != "triqdef" else ""
    else:
        pkg = importer.split(".") if is_package else importer.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
        base = ".".join([*pkg, *([node.module] if node.module else [])])
    if base:
        return [base]
    return [alias.name for alias in node.names]  # `from . import x`


def _imports():
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        if not name:
            continue  # the package's __init__ sits above every layer
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for target in _resolve(name, path.name == "__init__.py", node):
                    yield path, name, node, target


def test_every_module_has_a_layer():
    names = {_module_name(p).split(".")[0] for p in ROOT.rglob("*.py")} - {""}
    assert names <= set(LAYERS), sorted(names - set(LAYERS))


def test_imports_only_point_down():
    bad = []
    for path, name, node, target in _imports():
        if _layer(target) > _layer(name):
            bad.append(f"{path.name}:{node.lineno} {name} (layer {_layer(name)}) imports {target}")
    assert not bad, "\n".join(bad)


def test_the_imports_form_no_cycle():
    graph: dict[str, set[str]] = {}
    for _, name, _, target in _imports():
        if target != name and not name.startswith(target + "."):  # a package's own modules
            graph.setdefault(name, set()).add(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_import_of_the_package_inside_a_function():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    internal = (isinstance(node, ast.ImportFrom) and node.level > 0) or (
                        isinstance(node, (ast.Import, ast.ImportFrom))
                        and any(
                            (
                                a.name if isinstance(node, ast.Import) else node.module or ""
                            ).startswith("triqdef")
                            for a in node.names
                        )
                    )
                    if internal:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


@pytest.mark.parametrize(
    "module, absent",
    [
        ("triqdef.wrapper", ("triqdef.attacks", "triqdef.evaluate", "triqdef.baselines")),
        ("triqdef", ("triqdef.attacks", "triqdef.evaluate", "triqdef.models", "lightning", "art")),
        ("triqdef.integrations", ("lightning", "accelerate", "art", "triqdef.evaluate")),
    ],
)
def test_importing_the_core_loads_no_layer_above_it(module, absent):
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({absent!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_lazy_submodules_load_on_first_access():
    import triqdef

    for name in ("attacks", "evaluate", "functional", "losses", "models", "data", "baselines"):
        assert getattr(triqdef, name).__name__ == f"triqdef.{name}"


@pytest.mark.parametrize(
    "public, inner",
    [
        ("triqdef.wrapper:TriQDefWrapper", "triqdef.objective:TriQDefObjective"),
        ("triqdef.attacks.pool:PatchPool.build", "triqdef.attacks.craft:craft_patches"),
    ],
)
def test_a_public_signature_and_the_layer_it_forwards_to_share_their_defaults(public, inner):
    # the public call spells out its keywords (config-less); the layer below must not drift
    def resolve(spec):
        module, _, attr = spec.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return inspect.signature(obj).parameters

    outer, below = resolve(public), resolve(inner)
    shared = [n for n, p in below.items() if n in outer and p.kind is not p.VAR_KEYWORD]
    assert len(shared) >= 5
    for name in shared:
        assert outer[name].default == below[name].default, name
