"""The package's shape: imports flow one way, nothing but shiftwise installs at top level."""
import ast
import configparser
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# where each installed package lives in the repository
PACKAGE_DIRS = {"shiftwise": ROOT / "shiftwise", "shiftwise.convert": ROOT / "convert",
                "shiftwise.taichi_kernels": ROOT / "taichi_kernels"}
# a module may import modules of its own rank or below, never above
RANKS = [
    ("shiftwise.taichi_kernels",),
    ("shiftwise._version", "shiftwise.errors", "shiftwise.outputs", "shiftwise.progress", "shiftwise._runtime", "shiftwise.tiling",
     "shiftwise.reference"),
    ("shiftwise.ops",),
    ("shiftwise.dispatch", "shiftwise.functional", "shiftwise.onnx_form"),
    ("shiftwise.modules",),
    ("shiftwise.models", "shiftwise.convert", "shiftwise.sparse", "shiftwise.data", "shiftwise.evaluate",
     "shiftwise.compare", "shiftwise.erf", "shiftwise.export", "shiftwise.bench", "shiftwise.tile_report",
     "shiftwise.selftest"),
    ("shiftwise.cli",),
]
# what a function may import lazily: optional dependencies, and Taichi (slow to import, started on first use)
LAZY_OK = ("shiftwise.taichi_kernels", "taichi", "safetensors", "matplotlib", "onnx", "onnxruntime", "torch.onnx",
           "torch._dynamo", "numpy", "resource", "ctypes")


def _modules():
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts and parts[0] in ("convert", "taichi_kernels") and package == "shiftwise":
                continue
            name = ".".join((package,) + parts)
            found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    if node.level:
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module


def _imports(module: str):
    """(imported module, line, at module level) for every shiftwise-internal or lazy import."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(n) for n in tree.body}
    for stmt in tree.body:  # imports under `if TYPE_CHECKING:`/try at top level count as top level
        if isinstance(stmt, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES else target), node.lineno, id(node) in top


def _rank(name: str):
    for rank, prefixes in enumerate(RANKS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_module_has_a_rank():
    unranked = [m for m in MODULES if m != "shiftwise" and m != "shiftwise.__main__" and _rank(m) is None]
    assert not unranked, f"place these modules in RANKS: {unranked}"


def test_imports_flow_one_way():
    wrong = []
    for module in MODULES:
        if module in ("shiftwise", "shiftwise.__main__"):
            continue
        for target, line, _ in _imports(module):
            if target == "shiftwise":
                wrong.append(f"{module}:{line} imports the top-level package (a circle through shiftwise/__init__)")
            elif (target.startswith("shiftwise.") and None not in (_rank(target), _rank(module))
                  and _rank(target) > _rank(module)):
                wrong.append(f"{module}:{line} imports {target}, which sits above it")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = {m: {t for t, _, top in _imports(m) if top and t in MODULES} for m in MODULES}
    graph["shiftwise"] = set()  # the package's public API imports everything; nothing may import it back
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_function_level_imports_only_for_optional_or_lazy_dependencies():
    lazy = [f"{m}:{line} imports {t} inside a function"
            for m in MODULES for t, line, top in _imports(m)
            if not top and not any(t == ok or t.startswith(ok + ".") for ok in LAZY_OK)]
    assert not lazy, "\n".join(lazy)


def test_kernels_never_import_torch_and_convert_never_imports_taichi():
    for module in MODULES:
        names = {t for t, _, _ in _imports(module)}
        if module.startswith("shiftwise.taichi_kernels"):
            assert not any(n == "torch" or n.startswith("torch.") for n in names), module
        if module.startswith("shiftwise.convert"):
            assert not any(n == "taichi" or n.startswith("shiftwise.taichi_kernels") for n in names), module


def test_setup_installs_every_package_under_shiftwise_only():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["name"] != "shiftwise"  # that name belongs to an unrelated project on PyPI
    listed = set(cfg["options"]["packages"].split())
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert listed == packages
    assert all(p == "shiftwise" or p.startswith("shiftwise.") for p in listed)
    mapping = dict(line.split("=") for line in cfg["options"]["package_dir"].split("\n") if line.strip())
    assert {k.strip(): v.strip() for k, v in mapping.items()} == {"shiftwise.convert": "convert",
                                                                   "shiftwise.taichi_kernels": "taichi_kernels"}
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
