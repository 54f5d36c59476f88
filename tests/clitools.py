"""Checks shared by the CLI tests."""

from __future__ import annotations

import subprocess


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The CLI failed as Ember must: exit 125, one line ``ember: error: ...`` naming words."""
    err = proc.stderr.decode()
    assert proc.returncode == 125, (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("ember: error: "), err
    for w in words:
        assert w in err, err
    return err
