"""The code's shape as the runtime registry left it (docs/design.md): no import cycle inside exporter/,
no runtime named by hand outside exporter/runtimes/, and a client library that stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
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


def test_no_import_cycle_inside_exporter() -> None:
    files = {_module_name(p): p for p in (ROOT / "exporter").rglob("*.py") if "model_repository" not in p.parts}
    graph = {name: sorted(m for m in _imports(path, "exporter") if m in files and m != name)
             for name, path in files.items()}
    assert "exporter.runtimes.onnxruntime" in graph and graph["exporter.parity"], "the walk found nothing"
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in graph[name]:
            # A module importing its own package's __init__ (or the reverse) is Python's normal
            # package initialisation, not a cycle between two modules.
            if name.startswith(dep + ".") or dep.startswith(name + "."):
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def _runtime_names() -> set[str]:
    from exporter import runtimes

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
    assert not offenders, "runtime names compared by hand (use exporter.runtimes): " + "; ".join(offenders)
    # The check itself sees such a comparison.
    assert _compared_strings(ast.parse('if opts.runtime == "tensorrt": pass')) == [(1, "tensorrt")]


def test_clients_stand_alone() -> None:
    for path in (ROOT / "clients").glob("*.py"):
        assert not _imports(path, "exporter"), f"{path.name} imports exporter"
    # And at run time: with `exporter` unimportable, the whole client library still imports.
    code = (
        "import sys; sys.modules['exporter'] = None\n"
        "import clients, clients.sync, clients.aio, clients.search, clients.cli, clients.errors\n"
        "from clients import ClipClient, ClipClientError\n"
        "assert not issubclass(ClipClientError, ImportError)\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
