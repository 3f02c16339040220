"""The package's layers stay layers: no module imports a layer above its own, no import cycles,
the runtime never imports the test tools, and every module can be read in one sitting.

Layers, lowest first (docs/ARCHITECTURE.md draws them):

    kvs.errors, kvs.settings   vocabulary of failures and of a node's settings
    kvs.config                 ring, epoch: the configuration every layer speaks
    kvs.fsm                    the pure state machines and their command records
    kvs.raft                   the PySyncObj adapter: groups, replicas, storage
    kvs.node                   what one node hosts
    kvs.routing                key -> group -> replica, forwarding, peers
    kvs.reconfig               view changes: planner, coordinator, node-to-node protocol, watchers
    kvs.http                   the REST API and the internal API
    kvs.server                 wiring and lifecycle of one process
    kvs.cli, kvs.client        entry points

`kvs.testing` (linearizability checker, workload, local-cluster launcher) sits
beside them: it may import the runtime, the runtime may not import it (the
Docker image leaves it out), except the CLI's `local` command, lazily.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kvs"
LAYERS = [
    ("kvs.errors", "kvs.settings", "kvs.metrics", "kvs.logs"),
    ("kvs.config",),
    ("kvs.fsm",),
    ("kvs.raft",),
    ("kvs.node",),
    ("kvs.routing",),
    ("kvs.reconfig",),
    ("kvs.http",),
    ("kvs.server",),
    ("kvs.cli", "kvs.client", "kvs.cluster_client", "kvs.__main__", "kvs"),
]
TOOLS = "kvs.testing"
MAX_LINES = 410


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            # "kvs" itself is the package's __init__ only, not a prefix of everything
            if module == prefix or (prefix != "kvs" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def kvs_imports(path: pathlib.Path) -> set[str]:
    """Every kvs module `path` imports, at any depth of the file (function-level imports too)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kvs")
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; kvs uses absolute imports only"
            if node.module and node.module.split(".")[0] == "kvs":
                found.add(node.module)
                # `from kvs.routing import peers` imports the module kvs.routing.peers
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists():
                        found.add(candidate)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(module):
    if module.startswith(TOOLS):
        return
    own = layer_of(module)
    assert own is not None, f"{module} belongs to no layer: add it to LAYERS and to docs/ARCHITECTURE.md"
    for imported in kvs_imports(MODULES[module]):
        if imported.startswith(TOOLS):
            assert module == "kvs.cli.local", f"{module} imports the test tools ({imported})"
            continue
        theirs = layer_of(imported)
        assert theirs is not None and theirs <= own, f"{module} (layer {own}) imports {imported} (layer {theirs})"


def test_there_are_no_import_cycles():
    graph = {m: {i for i in kvs_imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_can_be_read_in_one_sitting(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by concern"


def test_the_layering_test_can_fail():
    assert layer_of("kvs.fsm.shard") < layer_of("kvs.routing.router")
    assert layer_of("kvs.kvs_unknown") is None
    assert layer_of("kvs.http.public") == 7 and layer_of("kvs") == 9
