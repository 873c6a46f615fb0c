"""The benchmark modules stay small and import each other in one direction (issue 21): no file over 600 lines, no
import cycle between benchmarks/*.py, and the step benchmarks import torch and each other at module top (no
function-local imports or classes built inside functions to delay an import)."""
import ast
import glob
import os

from .helpers import ROOT

BENCH_DIR = os.path.join(ROOT, "benchmarks")
STEP_MODULES = ("bench_step_ops", "bench_train_step", "harness", "step_census", "step_cost", "step_paths",
                "train_step_measure", "train_step_own", "train_step_profile", "train_step_rows")


def _modules():
    return {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(BENCH_DIR, "*.py"))}


def _tree(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def _benchmark_imports(tree, names):
    """benchmarks.* modules a module imports anywhere in its body (top level or inside functions)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("benchmarks."):
                out.add(node.module.split(".")[1])
            elif node.module == "benchmarks":
                out.update(a.name for a in node.names if a.name in names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("benchmarks."))
    return out & names


def test_no_benchmark_file_exceeds_600_lines():
    for name, path in _modules().items():
        with open(path) as f:
            n = sum(1 for _ in f)
        assert n <= 600, (name, n)


def test_benchmark_modules_import_without_a_cycle():
    mods = _modules()
    graph = {m: _benchmark_imports(_tree(p), set(mods)) for m, p in mods.items()}
    assert graph["bench_step_ops"] and graph["bench_train_step"]  # the graph is really read
    state = {}

    def visit(m, stack):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(stack + [m])
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_step_benchmarks_import_at_module_top():
    mods = _modules()
    for name in STEP_MODULES:
        tree = _tree(mods[name])
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                assert not isinstance(node, (ast.Import, ast.ImportFrom)), (name, fn.name, node.lineno)
                assert node is fn or not isinstance(node, ast.ClassDef), (name, fn.name, node.lineno)
