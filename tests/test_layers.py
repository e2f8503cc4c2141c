"""The package's structure, read from its own imports: one-way layers, no cycles, a torch-free coordinator."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fedembed"

# Lower layers never import higher ones. Within a layer, any direction is allowed (no cycles though).
LAYERS: list[tuple[str, list[str]]] = [
    ("core (numpy: tables, rows, fixed point, wire, identities, protocol state machines, config)", [
        "fedembed.errors", "fedembed.spec", "fedembed.vocab", "fedembed.recipe", "fedembed.sparse", "fedembed.tables",
        "fedembed.aggregate", "fedembed.normaliser", "fedembed.stopping", "fedembed.metrics", "fedembed.faults", "fedembed.store", "fedembed.wire",
        "fedembed.report", "fedembed.identity", "fedembed.config", "fedembed.certs", "fedembed.data",
        "fedembed.secagg", "fedembed.secagg.graph", "fedembed.secagg.primitives", "fedembed.secagg.quantize",
        "fedembed.secagg.vector", "fedembed.secagg.protocol",
        "fedembed.dp", "fedembed.dp.accounting", "fedembed.dp.selection", "fedembed.dp.noise",
        "fedembed.dp.distributed",
    ]),
    ("model and task (torch)", [
        "fedembed.residual", "fedembed.model", "fedembed.cooc", "fedembed.task", "fedembed.train", "fedembed.serving",
        "fedembed.workingset",
        "fedembed.guard", "fedembed.dp.clipping", "fedembed.dp.local",
    ]),
    ("the two sides", [
        "fedembed.coordinator", "fedembed.secagg.server", "fedembed.org", "fedembed.secagg.client",
        "fedembed.baselines", "fedembed.export",
    ]),
    ("apps (Flower)", ["fedembed.apps", "fedembed.worker", "fedembed.audit"]),
    ("deployment, simulation, command line", ["fedembed.deploy", "fedembed.simulation", "fedembed.cli"]),
]
COORDINATOR_SIDE = ["fedembed.coordinator", "fedembed.secagg.server"]
ORGANISATION_SIDE = ["fedembed.org", "fedembed.secagg.client", "fedembed.export"]
#: What carries a federated round: no baseline may live in it (a baseline's branch in the
#: privacy path is where a head would get onto the wire).
PRIVACY_PATH = ["fedembed.coordinator", "fedembed.secagg", "fedembed.org", "fedembed.wire", "fedembed.apps",
                "fedembed.worker", "fedembed.deploy"]


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every fedembed module ``name`` imports, anywhere in the file (function-level and TYPE_CHECKING included)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("fedembed")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedembed") and not node.level:
            for a in node.names:
                deps.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
    return {d for d in deps if d != name and d != "fedembed"}


def _layer(name: str) -> int:
    best = None
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and (best is None or len(m) > len(best[1])):
                best = (i, m)
    assert best is not None, f"{name} is in no layer: place it in tests/test_layers.py LAYERS"
    return best[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {n: _imports(n, p, modules) for n, p in modules.items() if n != "fedembed"}


def test_every_import_points_down_or_sideways():
    upward = []
    for name, deps in _graph().items():
        for d in deps:
            if _layer(d) > _layer(name):
                upward.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {d} ({LAYERS[_layer(d)][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_the_coordinator_side_never_imports_the_organisation_side():
    graph = _graph()
    bad = [f"{n} imports {d}" for n in COORDINATOR_SIDE for d in graph[n] if any(d.startswith(o) for o in ORGANISATION_SIDE)]
    assert not bad, bad


def test_no_baseline_lives_in_the_privacy_path():
    graph = _graph()
    bad = [f"{n} imports {d}" for n, deps in graph.items() if any(n == p or n.startswith(p + ".") for p in PRIVACY_PATH)
           for d in deps if d.startswith("fedembed.baselines")]
    assert not bad, bad


def test_there_are_no_import_cycles():
    graph = _graph()
    seen: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(n: str, stack: list[str]) -> None:
        seen[n] = 1
        for d in sorted(graph.get(n, ())):
            if seen.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in seen and d in graph:
                visit(d, stack + [d])
        seen[n] = 2

    for n in sorted(graph):
        if n not in seen:
            visit(n, [n])
    assert not cycles, cycles


def test_the_coordinator_and_its_server_app_import_no_torch_and_no_task():
    code = ("import sys, fedembed.apps.server, fedembed.coordinator, fedembed.secagg.server; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('fedembed.task') "
            "or m.startswith('fedembed.data')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_apps_live_inside_the_package():
    import fedembed.apps.client
    import fedembed.apps.server

    assert fedembed.apps.server.app is not None and fedembed.apps.client.app is not None
    for top in ("server", "client"):
        assert not (PKG.parent / top).exists(), f"a top-level package {top}/ is back"
