"""The package's shape: no import cycles, library code never imports a command, every module
imports on its own, and `import ovseg_jax` stays light (its public API loads lazily)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "ovseg_jax"
# What users type after `python -m`: thin command modules (parse arguments, call the library, print).
COMMANDS = {"ovseg_jax." + name for name in ("train", "predict", "serve", "evaluate", "mine_pairs", "ablate",
                                             "export", "merge", "demo", "amg", "data.__main__")}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (top level or inside
    functions: a lazy import is still a dependency)."""
    modules = set(module_names())
    graph: dict[str, set[str]] = {}
    for name in modules:
        path = PACKAGE.parent / Path(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                if target.startswith("ovseg_jax"):
                    resolved = _resolve(target, modules)
                    if resolved and resolved != name and resolved != "ovseg_jax":
                        edges.add(resolved)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_library_modules_never_import_commands():
    offenders = {f"{module} -> {target}" for module, targets in import_graph().items() if module not in COMMANDS
                 for target in targets if target in COMMANDS}
    assert not offenders, sorted(offenders)


def test_every_command_is_a_module_users_can_run():
    present = set(module_names())
    for command in COMMANDS:
        assert command in present, command
        source = (PACKAGE.parent / Path(*command.split("."))).with_suffix(".py").read_text()
        assert 'if __name__ == "__main__":' in source, command


@pytest.mark.slow
def test_every_module_imports_on_its_own_and_the_top_level_stays_light():
    """One fresh interpreter: `import ovseg_jax` must not load JAX; then each module imports (an
    import cycle that only bites at import time would fail here); the public names resolve."""
    script = (
        "import importlib, sys\n"
        "import ovseg_jax\n"
        "heavy = sorted(m for m in ('jax', 'flax', 'torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, f'import ovseg_jax loaded {heavy}'\n"
        f"for name in {sorted(module_names())!r}:\n"
        "    importlib.import_module(name)\n"
        "missing = [n for n in ovseg_jax.__all__ if getattr(ovseg_jax, n, None) is None]\n"
        "assert not missing, missing\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_graph_counts_imports_inside_functions():
    """The demo imports the trainer inside a function (to keep `--help` fast): still an edge."""
    assert "ovseg_jax.training.trainer" in import_graph()["ovseg_jax.experiments.demo"]
