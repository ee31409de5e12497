"""The code's shape (docs/design.md, "Module map"): layers that import only downwards, stages that are
siblings, sources and runtimes each registered in one place, no import cycle, one import namespace,
and a client library that stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level folders and the namespace each installs as (pyproject's package-dir).
NAMESPACE = {"exporter": "clip_triton.exporter", "clients": "clip_triton.clients", "benchmarks": "benchmarks"}
# exporter/'s layers, lowest first: a module may import its own layer and the ones before it.
LAYERS = ["base", "sources", "runtimes", "parity", "stages", "build", "cli"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = [*NAMESPACE[parts[0]].split("."), *parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str) -> set[str]:
    """Every module of `package` that `path` imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {name for name in found if name == package or name.startswith(package + ".")}


def _modules(folder: str) -> dict[str, Path]:
    return {_module_name(p): p for p in (ROOT / folder).rglob("*.py")}


def _graph(folder: str) -> dict[str, list[str]]:
    files = _modules(folder)
    package = NAMESPACE[folder]
    return {name: sorted(m for m in _imports(path, package) if m in files and m != name)
            for name, path in files.items()}


def _cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for dep in graph[name]:
            # A module importing its own package's __init__ (or the reverse) is Python's normal
            # package initialisation, not a cycle between two modules.
            if name.startswith(dep + ".") or dep.startswith(name + "."):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


@pytest.mark.parametrize("folder", ["exporter", "clients", "benchmarks"])
def test_no_import_cycle(folder: str) -> None:
    graph = _graph(folder)
    assert len(graph) > 5 and any(graph.values()), "the walk found nothing"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    # The check itself sees a cycle.
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]


def _layer(module: str) -> str | None:
    rest = module.removeprefix("clip_triton.exporter").lstrip(".")
    return rest.split(".")[0] if rest.split(".")[0] in LAYERS else None


def test_layers_import_only_downwards_and_stages_are_siblings() -> None:
    graph = _graph("exporter")
    offenders = []
    for name, deps in graph.items():
        layer = _layer(name)
        if layer is None:
            continue
        for dep in deps:
            dep_layer = _layer(dep)
            if dep_layer is None:
                continue
            if LAYERS.index(dep_layer) > LAYERS.index(layer):
                offenders.append(f"{name} ({layer}) imports {dep} ({dep_layer})")
            elif layer == dep_layer == "stages" and dep != "clip_triton.exporter.stages":
                offenders.append(f"stage {name} imports stage {dep}")
    assert not offenders, "; ".join(offenders)
    stages = {n for n in graph if _layer(n) == "stages" and n != "clip_triton.exporter.stages"}
    assert {n.rsplit(".", 1)[1] for n in stages} >= {"export", "fp16", "engines", "repository", "deploy"}
    # build.py is the one place that composes stages: no other module imports two of them.
    composers = {n for n, deps in graph.items() if len(stages & set(deps)) > 1}
    assert composers <= {"clip_triton.exporter.build", "clip_triton.exporter.cli"}, composers


def test_clients_never_import_the_exporter() -> None:
    for path in (ROOT / "clients").rglob("*.py"):
        assert not _imports(path, "clip_triton.exporter"), f"{path.name} imports the exporter"
    # And at run time: with the exporter unimportable, the whole client library still imports.
    code = (
        "import sys; sys.modules['clip_triton.exporter'] = None\n"
        "import clip_triton.clients, clip_triton.clients.sync, clip_triton.clients.aio\n"
        "import clip_triton.clients.search, clip_triton.clients.cli, clip_triton.clients.errors\n"
        "import clip_triton.clients.gateway.cli, clip_triton.clients.gateway.app\n"
        "from clip_triton import ClipClient, ClipClientError\n"
        "assert not issubclass(ClipClientError, ImportError)\n"
        "assert 'torch' not in sys.modules, 'the client imported torch'\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_one_import_namespace() -> None:
    """Every import of the project's code goes through clip_triton (a bare `exporter` or `clients`
    would load a second copy of the same module beside the installed one)."""
    offenders = []
    for folder in ("clip_triton", "exporter", "clients", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for bare in ("exporter", "clients"):
                if _imports(path, bare):
                    offenders.append(f"{path.relative_to(ROOT)} imports {bare}")
    assert not offenders, "; ".join(offenders)


@pytest.mark.parametrize("package", ["runtimes", "sources"])
def test_registered_in_one_place(package: str) -> None:
    """Each module of exporter/<package>/ (but its base) registers one entry when the package's
    __init__ imports it; nothing else calls `register`."""
    import importlib

    registry = importlib.import_module(f"clip_triton.exporter.{package}")
    modules = {p.stem for p in (ROOT / "exporter" / package).glob("*.py")} - {"__init__", "base"}
    init_imports = _imports(ROOT / "exporter" / package / "__init__.py", f"clip_triton.exporter.{package}")
    assert {f"clip_triton.exporter.{package}.{m}" for m in modules} <= init_imports
    entries = registry.registered()
    assert len(entries) == len(modules) and len({e.name for e in entries}) == len(entries)
    callers = []
    for path in [*(ROOT / "exporter").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        if path.parent.name in ("runtimes", "sources") and path.stem not in ("__init__", "base"):
            continue  # a runtime or source module registering itself
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) == "register":
                    callers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not callers, "register() called outside a source or runtime module: " + "; ".join(callers)


def _runtime_names() -> set[str]:
    from clip_triton.exporter import runtimes

    names = {r.name for r in runtimes.registered()}
    # Runner names too: what parity stages and benchmark keys are called.
    return names | {"pytorch-cuda", "onnx-fp32", "onnx-fp16", "ort_fp32", "ort_fp16", "trt_fp16", "torch_fp32"}


def _compared_strings(tree: ast.AST) -> list[tuple[int, str]]:
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                hits += [(node.lineno, v.value) for v in values
                         if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return hits


def test_no_runtime_name_comparisons_outside_the_registry() -> None:
    names = _runtime_names()
    offenders = []
    for path in [*(ROOT / "exporter").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        if "runtimes" in path.parts:
            continue
        for line, value in _compared_strings(ast.parse(path.read_text())):
            if value in names:
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    assert not offenders, "runtime names compared by hand (use clip_triton.exporter.runtimes): " + "; ".join(offenders)
    # The check itself sees such a comparison.
    assert _compared_strings(ast.parse('if opts.runtime == "tensorrt": pass')) == [(1, "tensorrt")]
