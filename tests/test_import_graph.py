"""The import graph of src/ember as docs/architecture.md draws it (issue 12).

The layers themselves are import-linter contracts in pyproject.toml, run by
.ci/run (`lint-imports`) and here; this file adds what a layers contract cannot
say: no import circles anywhere (function-level imports included), and no
module outside ``vmm/`` importing a hypervisor's driver."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("ember", exclude_type_checking_imports=True)


def _circles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10000))
    try:
        for m in sorted(graph.modules):
            if m not in index:
                visit(m)
    finally:
        sys.setrecursionlimit(limit)
    return out


def test_no_import_circles(graph):
    assert _circles(graph) == []


def test_only_vmm_names_a_hypervisor_driver(graph):
    drivers = {m for m in graph.modules
               if m.startswith(("ember.vmm.firecracker", "ember.vmm.qemu"))}
    assert "ember.vmm.qemu.driver" in drivers and "ember.vmm.firecracker.driver" in drivers
    offenders = {m for d in drivers for m in graph.find_modules_that_directly_import(d)
                 if not m.startswith("ember.vmm")}
    assert offenders == set()


def test_the_layer_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (scripts/setup.sh installs it)")
    res = subprocess.run([lint], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout[-3000:]
