"""The import layers of the service, read from the source (``make lint`` runs this file).

Imports point down only: the wiring (app, commands, runtime) uses the parts that do the work
(agent, follower, bridge, web), which use the building blocks (settings, envelope, validation,
store, metrics, the view). views/ is a leaf: it imports nothing from streams/ or bridge/, and is
handed what it needs. Within a layer a module may use another, but no two modules may import
each other, directly or round a circle, not even for type checking only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("streams", "views", "bridge", "publisher")

WIRING, PARTS, BLOCKS = 3, 2, 1
# Every module of the service, with its layer; a new module must be placed here.
LAYERS: dict[str, int] = {
    "streams.app": WIRING,
    "streams.commands": WIRING,
    "streams.runtime": WIRING,
    "streams.agent": PARTS,
    "streams.follower": PARTS,
    "streams.monitor": PARTS,
    "streams.web_driver": PARTS,
    "streams.fast_web": PARTS,
    "streams.http_protocol": PARTS,
    "views.web": PARTS,
    "bridge.nats_bridge": PARTS,
    "bridge.jetstream": PARTS,
    "bridge.pull": PARTS,
    "bridge.acks": PARTS,
    "bridge.client": PARTS,
    "bridge.embedded_nats": PARTS,
    "streams.config": BLOCKS,
    "streams.envelope": BLOCKS,
    "streams.validation": BLOCKS,
    "streams.store": BLOCKS,
    "streams.events": BLOCKS,
    "streams.memory_store": BLOCKS,
    "streams.snapshots": BLOCKS,
    "streams.pg_hosts": BLOCKS,
    "streams.metrics": BLOCKS,
    "streams.logs": BLOCKS,
    "streams.http_message": BLOCKS,
    "streams.http_router": BLOCKS,
    "streams.http_limits": BLOCKS,
    "streams.retry": BLOCKS,
    "streams.private_files": BLOCKS,
    "streams.embedded_postgres": BLOCKS,
    "views.view": BLOCKS,
}


def modules() -> dict[str, Path]:
    """Every module of the service's packages, by dotted name (package __init__ files too)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, known: set[str]) -> Iterator[str]:
    """The service's modules ``path`` imports, at any depth of the file (type-checking
    blocks and functions included); ``from package import module`` counts as the module."""
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in known:
                yield name


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {
        name: {imported for imported in imports_of(path, known) if imported != name}
        for name, path in found.items()
    }


def test_every_module_has_a_layer() -> None:
    unplaced = [
        name
        for name in modules()
        if name.split(".")[0] != "publisher" and name not in PACKAGES and name not in LAYERS
    ]
    assert not unplaced, f"place these in LAYERS of tests/test_layers.py: {unplaced}"


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_point_down(module: str) -> None:
    upward = [
        imported
        for imported in graph()[module]
        if imported in LAYERS and LAYERS[imported] > LAYERS[module]
    ]
    assert not upward, f"{module} (layer {LAYERS[module]}) imports from a higher layer: {upward}"


def test_views_is_a_leaf() -> None:
    reaching_out = {
        module: sorted(imported for imported in imports if not imported.startswith("views"))
        for module, imports in graph().items()
        if module.startswith("views")
    }
    assert not any(reaching_out.values()), reaching_out


def test_nothing_imports_the_publisher_or_the_wiring_but_the_wiring() -> None:
    offenders = {
        module: sorted(
            imported
            for imported in imports
            if (imported.startswith("publisher") and not module.startswith("publisher"))
            or (LAYERS.get(imported) == WIRING and LAYERS.get(module) != WIRING)
        )
        for module, imports in graph().items()
    }
    assert not any(offenders.values()), offenders


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(edges.get(module, ())):
            if imported in path:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in done:
                visit(imported, [*path, imported])
        done.add(module)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module])
    # A package's __init__ re-exporting its modules is not a cycle of the code's layers.
    real = [cycle for cycle in cycles if not any(name in PACKAGES for name in cycle)]
    assert not real, f"import cycles: {real}"
