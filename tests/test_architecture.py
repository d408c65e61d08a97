"""The package's import contract (docs/architecture.md): stages import one way, no cycles, no hidden imports.

The command line (``cli/``, installed as ``covidctnet.cli``) is checked with the package: it may import every stage,
no stage imports it (``__main__`` aside), and it has no cycles or private imports. Relative imports are refused
everywhere, since the checks could not place them and an absolute import says which stage it reaches.

The checks read the source with ``ast`` (nothing is imported), so a violation is found even where it would only fail
at run time. Each check is also run on a small synthetic package that breaks it, so the checks themselves can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "covidctnet"

# stage -> the stages it may import (besides itself). `covidctnet/__init__.py` is the stage "" and may import core.
ALLOWED: dict[str, set[str]] = {
    "": {"core"},
    "__main__": {"cli"},  # `python -m covidctnet` runs the command line
    "core": set(),
    "io": {"core"},
    "preprocessing": {"core", "io"},
    # the Keras import records the official preprocessing profile in the model directory it writes
    "models": {"core", "preprocessing"},
    # residual volumes become network input by the classifier's own contract (models.cnn3d)
    "data": {"core", "io", "preprocessing", "models"},
    "evaluation": {"core"},
    "training": {"core", "io", "preprocessing", "models", "data", "evaluation"},
    "inference": {"core", "io", "preprocessing", "models", "data", "evaluation"},
    # the commands parse options and call one library function each
    "cli": {"core", "io", "preprocessing", "models", "data", "evaluation", "training", "inference"},
}
# Stages whose modules import the library inside functions on purpose: `covidctnet --help` stays instant.
LIBRARY_LAZY_STAGES = {"cli"}


def _modules(root: Path) -> dict[str, Path]:
    """``covidctnet.x.y`` -> file, for every module below ``root`` (the package folder) and below the ``cli`` folder
    beside it (``covidctnet.cli.x``, as pyproject.toml's package-dir installs it)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    cli = root.parent / "cli"
    for path in sorted(cli.rglob("*.py")) if cli.is_dir() else []:
        parts = (root.name, *path.relative_to(root.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, package: str) -> list[tuple[str, list[str], bool]]:
    """``(imported module, imported names, inside a function)`` for every import of ``package`` in the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == package or child.module.startswith(package + "."):
                    found.append((child.module, [a.name for a in child.names], nested))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        found.append((alias.name, [], nested))
            visit(child, nested)

    visit(tree, False)
    return found


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _target(module: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The modules an import statement loads: ``from pkg.sub import mod`` loads ``pkg.sub.mod``."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
    return [module, *subs]


def stage_violations(root: Path) -> list[str]:
    """Imports of a stage that the contract does not allow (lower stages importing higher ones)."""
    package = root.name
    bad = []
    for module, path in _modules(root).items():
        for target, _, _ in _imports(path, package):
            src, dst = _stage(module), _stage(target)
            if dst != src and dst not in ALLOWED.get(src, set()):
                bad.append(f"{module} ({src or 'top'}) imports {target} ({dst or 'top'})")
    return bad


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles in the module import graph (every import, wherever it stands in the module)."""
    package = root.name
    modules = _modules(root)
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in _imports(path, package):
            graph[module].update(t for t in _target(target, names, modules) if t in modules and t != module)
        # importing a.b.c runs a/__init__ and a/b/__init__ first; those are not edges of this module's making
    cycles, state, stack = [], {}, []

    def dfs(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    return cycles


def hidden_imports(root: Path) -> list[str]:
    """Imports of the package inside functions: they hide cycles and layering, so library imports stand at the top
    (except in :data:`LIBRARY_LAZY_STAGES`)."""
    package = root.name
    return [f"{module}: {target}" for module, path in _modules(root).items()
            if _stage(module) not in LIBRARY_LAZY_STAGES
            for target, _, nested in _imports(path, package) if nested]


def relative_imports(root: Path) -> list[str]:
    """``from . import x`` / ``from ..a import b`` anywhere: the other checks read absolute imports only."""
    bad = []
    for module, path in _modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                bad.append(f"{module}: {'.' * node.level}{node.module or ''}")
    return bad


# Third-party imports inside functions: only the optional extras anywhere, MONAI (2.2 s to import after torch) where a
# MONAI network or transform is built, so that predict, which builds none, does not pay for it, and anything in the
# stages that read and preprocess scans (a preprocess worker then imports only what it uses; the rest of the library
# imports at the top).
LAZY_ANYWHERE = {"onnx", "onnxruntime", "openvino", "h5py", "dask", "distributed", "highdicom", "monai"}
LAZY_STAGES = {"core", "io", "preprocessing"}


def lazy_imports(root: Path) -> list[str]:
    """Third-party imports inside functions outside :data:`LAZY_STAGES`, other than the optional extras."""
    bad = []
    for module, path in _modules(root).items():
        if _stage(module) in LAZY_STAGES | LIBRARY_LAZY_STAGES:
            continue
        tree = ast.parse(path.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                bad += [f"{module}: {n}" for n in names
                        if n.split(".")[0] not in LAZY_ANYWHERE | {root.name} and f"{module}: {n}" not in bad]
    return bad


def private_imports(root: Path) -> list[str]:
    """``from covidctnet.x import _name`` across modules: a helper two modules need is public."""
    package = root.name
    return [f"{module} imports {target}.{name}" for module, path in _modules(root).items()
            for target, names, _ in _imports(path, package) for name in names
            if name.startswith("_") and not name.startswith("__")]


@pytest.mark.parametrize(
    "check", [stage_violations, import_cycles, hidden_imports, private_imports, lazy_imports, relative_imports]
)
def test_package_keeps_the_contract(check):
    assert check(PACKAGE) == []


def test_the_command_line_is_checked():
    modules = _modules(PACKAGE)
    assert "covidctnet.cli" in modules and "covidctnet.cli.evaluate" in modules


def _write(root: Path, files: dict[str, str]) -> Path:
    """A synthetic ``covidctnet`` package below ``root``; paths starting ``../cli/`` go to the cli folder beside it."""
    pkg = root / "covidctnet"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    for folder in [pkg, *[p for p in [*pkg.rglob("*"), *(root / "cli").rglob("*")] if p.is_dir()]]:
        (folder / "__init__.py").touch()
    if (root / "cli").is_dir():
        (root / "cli" / "__init__.py").touch()
    return pkg


def test_checks_catch_what_they_guard(tmp_path):
    pkg = _write(tmp_path, {
        "core/a.py": "from covidctnet.training.t import fit\n",                   # core importing a higher stage
        "training/t.py": "from covidctnet.core.a import x\n\ndef fit():\n    from covidctnet.core import b\n",
        "core/b.py": "from covidctnet.io.r import _helper\n",
        "io/r.py": "def _helper():\n    pass\n",
        "models/m.py": "def build():\n    import torch\n    import onnx\n",
        "io/s.py": "from .r import _helper\n",                                     # relative import
        "data/d.py": "from covidctnet.cli.c import run\n",                        # a stage importing the cli
        "../cli/c.py": "from covidctnet.inference.p import _go\n\ndef run():\n    from covidctnet.core import a\n",
        "inference/p.py": "def _go():\n    pass\n",
    })
    assert stage_violations(pkg) == ["covidctnet.core.a (core) imports covidctnet.training.t (training)",
                                     "covidctnet.core.b (core) imports covidctnet.io.r (io)",
                                     "covidctnet.data.d (data) imports covidctnet.cli.c (cli)"]
    assert import_cycles(pkg) == [["covidctnet.core.a", "covidctnet.training.t", "covidctnet.core.a"]]
    assert hidden_imports(pkg) == ["covidctnet.training.t: covidctnet.core"]  # the cli's lazy import is allowed
    assert private_imports(pkg) == ["covidctnet.core.b imports covidctnet.io.r._helper",
                                    "covidctnet.cli.c imports covidctnet.inference.p._go"]
    assert relative_imports(pkg) == ["covidctnet.io.s: .r"]
    assert lazy_imports(pkg) == ["covidctnet.models.m: torch"]  # onnx is an optional extra


def test_clean_synthetic_package_passes(tmp_path):
    pkg = _write(tmp_path, {"core/a.py": "X = 1\n", "io/r.py": "from covidctnet.core.a import X\n"})
    assert stage_violations(pkg) == import_cycles(pkg) == hidden_imports(pkg) == private_imports(pkg) == []
    assert relative_imports(pkg) == []
    assert lazy_imports(pkg) == []
