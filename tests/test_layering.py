"""Data flows one way: hf -> nn -> ops -> (triton | _C | reference), fastbert._runtime under all of them
(docs/design.md). Every `import fastbert...` in the package, function-level ones included, is checked
against the layer it may reach."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "fastbert"
# layer -> the fastbert modules (prefixes) it may import; a layer may always import itself
ALLOWED = {
    "fastbert._runtime": (),
    "fastbert.reference": ("fastbert._runtime",),
    "fastbert.testing": (),
    "fastbert.backends": ("fastbert._runtime", "fastbert._C"),
    "fastbert.triton": ("fastbert._runtime",),
    "fastbert.ops": ("fastbert._runtime", "fastbert.backends", "fastbert.reference"),
    "fastbert.nn": ("fastbert._runtime", "fastbert.backends", "fastbert.ops"),
    "fastbert.hf": ("fastbert._runtime", "fastbert.backends", "fastbert.ops", "fastbert.nn"),
}


def _layer(module: str) -> str:
    return next((layer for layer in sorted(ALLOWED, key=len, reverse=True)
                 if module == layer or module.startswith(layer + ".")), module)


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names if node.module == "fastbert")


# every module but the benchmark (a consumer of the whole package) and fastbert/__init__.py (the
# public face, which re-exports from every layer)
MODULES = sorted(p for p in PKG.rglob("*.py")
                 if p.relative_to(PKG).parts[0] != "bench" and p != PKG / "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_imports_upward(path):
    rel = path.relative_to(PKG).with_suffix("")
    module = ".".join(("fastbert",) + tuple(p for p in rel.parts if p != "__init__"))
    layer = _layer(module)
    assert layer in ALLOWED, f"{module} belongs to no layer of ALLOWED"
    bad = [imp for imp in _imports(path) if imp.startswith("fastbert") and imp != "fastbert"
           and _layer(imp) != layer and not any(imp == a or imp.startswith(a + ".") for a in ALLOWED[layer])]
    assert not bad, f"{module} ({layer}) imports {bad}"
