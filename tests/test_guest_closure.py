"""The guest ships only what guest/rootfs.py copies (EMBER_FILES): the agent must
run on it alone. Every module of that set may import only modules of that set
(plus the standard library and protobuf, installed beside it), found statically,
imports inside functions included; type-checking-only imports do not count."""

from __future__ import annotations

import grimp

from ember.guest.rootfs import EMBER_FILES


def _shipped(module: str) -> bool:
    if module == "ember":
        return False  # the guest gets its own package root (GUEST_INIT)
    top = module.split(".")[1]
    return top in EMBER_FILES or f"{top}.py" in EMBER_FILES


def test_what_the_guest_ships_imports_nothing_host_only():
    graph = grimp.build_graph("ember", exclude_type_checking_imports=True)
    shipped = {m for m in graph.modules if _shipped(m)}
    assert "ember.agent.service" in shipped and "ember.ttrpc" in shipped
    bad = []
    for module in sorted(shipped):
        for imported in graph.find_modules_directly_imported_by(module):
            if not _shipped(imported):
                bad.append(f"{module} imports {imported}")
    assert bad == []


def test_the_host_client_is_not_shipped():
    graph = grimp.build_graph("ember", exclude_type_checking_imports=True)
    assert "ember.sandbox.agent_client" in graph.modules
    assert not _shipped("ember.sandbox.agent_client")
    assert not [m for m in graph.modules if m.startswith("ember.agent.client")]


def test_the_guest_package_root_is_its_own(tmp_path, monkeypatch):
    """The guest's ember/__init__.py imports only the version; the agent runs from
    the copied tree alone (a fresh interpreter with nothing but it on its path)."""
    import subprocess
    import sys

    from ember.guest import rootfs

    monkeypatch.setattr(rootfs, "SITE_PACKAGES", ())
    rootfs.copy_python_packages(tmp_path)
    tree = tmp_path / rootfs.PYTHONPATH.lstrip("/")
    assert (tree / "ember" / "__init__.py").read_text() == rootfs.GUEST_INIT
    assert not (tree / "ember" / "api.py").exists()
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; import ember, ember.agent.service; "
            "assert not [m for m in sys.modules if m.startswith(('ember.api', 'ember.sandbox'))]; "
            "print(ember.__version__)")
    out = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == __import__("ember").__version__
