"""The package's architecture as its imports show it: no cycle, core free of engines, no name prefixes.

Every import statement counts, also one deferred inside a function: a cycle that only works
because half of it is deferred is still a cycle.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qsr_ds"
ENGINES = ("qsr_ds.deepspeed", "qsr_ds.fsdp", "qsr_ds.hf", "qsr_ds.local")
INTEGRATION_LIBRARIES = ("deepspeed", "transformers", "accelerate")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(qsr_ds modules, outside top-level packages) that module ``name`` imports anywhere in its text."""
    inside, outside = set(), set()
    package = name if is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qsr_ds"):
                    inside.add(alias.name)
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
                if not base.startswith("qsr_ds"):
                    outside.add(base.split(".")[0])
                    continue
            else:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                inside.add(candidate if candidate in MODULES else base)
    return {m for m in inside if m in MODULES and m != name}, outside


GRAPH = {name: imports_of(name)[0] for name in MODULES}


def find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_checker_sees_imports_deferred_into_functions_and_relative_ones():
    # qsr_ds.hf imports qsr_ds.deepspeed.hook only inside a function (deepspeed is optional for HF users)
    assert "qsr_ds.deepspeed.hook" in GRAPH["qsr_ds.hf"]
    assert {"qsr_ds.sync.averager", "qsr_ds.sync.overlap", "qsr_ds.config"} <= GRAPH["qsr_ds.sync.core"]
    assert "qsr_ds.deepspeed.checkpoint" in GRAPH["qsr_ds.deepspeed.hook"]  # `from . import checkpoint as ...`


def test_no_import_cycle_in_the_package():
    assert find_cycle() is None, f"import cycle: {' -> '.join(find_cycle())}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("qsr_ds.sync")))
def test_the_sync_core_imports_no_engine_and_no_integration_library(name):
    inside, outside = imports_of(name)
    assert not [m for m in inside if m.startswith(ENGINES)], f"{name} imports an engine adapter"
    assert not outside & set(INTEGRATION_LIBRARIES), f"{name} imports {outside & set(INTEGRATION_LIBRARIES)}"


def test_config_imports_nothing_of_the_core():
    assert not [m for m in GRAPH["qsr_ds.config"] if m.startswith("qsr_ds.sync")]


def test_engine_files_live_in_packages_not_behind_name_prefixes():
    prefixed = [m for m in MODULES if m.rpartition(".")[2].startswith(("ds_", "fsdp_"))]
    assert prefixed == []
    assert {"qsr_ds.sync", "qsr_ds.deepspeed", "qsr_ds.fsdp", "qsr_ds.planning", "qsr_ds.kernels"} <= {
        m for m in MODULES if is_package(m)}


def test_the_test_helper_does_not_ship_in_the_package():
    assert "qsr_ds.testing" not in MODULES
