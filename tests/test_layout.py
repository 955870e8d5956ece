"""The package layout is part of the API: public names are not modules, implementation
modules are private, and imports point down the layers."""

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import hvpfunc as hf

PUBLIC_MODULES = {"tree", "results", "testing", "distributed", "cli"}
PACKAGE = Path(hf.__file__).parent
# layer of each top-level private package or module: imports may point down or sideways
LAYERS = {"_types": 0, "_sharding": 0, "_plotting": 0, "_precision": 0, "tree": 1, "results": 1, "_outcome": 1, "_progress": 1, "_operator": 1, "_krylov": 1,
          "_products": 2, "_eigen": 3, "_stochastic": 3, "_solve": 3,
          "_interop": 4, "testing": 4, "distributed": 4, "cli": 4, "__main__": 4}


def test_no_public_name_is_also_a_module():
    for name in hf.__all__:
        obj = getattr(hf, name)
        if name in PUBLIC_MODULES:
            assert isinstance(obj, types.ModuleType), name
            continue
        assert not isinstance(obj, types.ModuleType), f"hf.{name} is a module"
        assert importlib.util.find_spec(f"hvpfunc.{name}") is None, f"hvpfunc.{name} is also a module"


def test_every_module_but_the_namespaces_is_private():
    names = {m.name for m in pkgutil.iter_modules([str(PACKAGE)])}
    assert {n for n in names if not n.startswith("_")} == PUBLIC_MODULES
    for sub in ("_products", "_eigen", "_stochastic", "_solve"):
        assert (PACKAGE / sub / "__init__.py").exists()


def test_all_lists_exactly_the_public_api():
    public = {n for n in vars(hf) if not n.startswith("_")}
    # importing a submodule sets it as an attribute; only hf.tree is exported as one
    assert set(hf.__all__) == public - (PUBLIC_MODULES - {"tree"})
    assert (PACKAGE / "py.typed").exists()


def _top(module: str) -> str:
    return module.split(".")[0]


def test_imports_point_down_the_layers_and_public_modules_import_no_private_names():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        here = rel.parts[0] if rel.parts[0] != "__init__" else None
        if here is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = list(rel.parts[:-1])[: len(rel.parts) - node.level]
            target = ".".join(base + ([node.module] if node.module else []))
            if not target:
                continue
            there = _top(target)
            if there == here:
                continue
            assert LAYERS[there] <= LAYERS[here], f"{rel} (layer {LAYERS[here]}) imports {target} (layer {LAYERS[there]})"
            for alias in node.names:
                assert not alias.name.startswith("_"), f"{rel} imports the private name {alias.name} from {target}"
