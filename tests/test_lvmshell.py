"""The long-lived lvm shell the LVM backend runs its commands through.

These run on the host: lvm's shell works without device-mapper for what is
checked here (status, lvm's error lines, the shell's life). The commands that
change a thin pool are proven in a VM by test_snapshotter_lvm.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from ember.snapshotter.lvmshell import LvmError, LvmShell, OneShot, lv_rows, open_runner

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("lvm"),
                                reason="needs root and lvm2")


def test_a_failure_is_lvms_own_line_and_the_shell_goes_on():
    shell = LvmShell()
    try:
        with pytest.raises(LvmError) as exc:
            shell.run("lvs", "--reportformat", "json", "ember-no-such-vg", what="listing LVs")
        assert exc.value.message == ('listing LVs: Volume group "ember-no-such-vg" not found; '
                                     'Cannot process volume group ember-no-such-vg')
        pid = shell._proc.pid
        doc = shell.run("version", what="version")
        assert any("LVM version" in e["log_message"] for e in doc["log"])
        assert shell._proc.pid == pid  # the same shell ran both
    finally:
        shell.close()
    assert shell._proc is None


def test_the_same_reports_as_one_process_per_command():
    shell = LvmShell()
    try:
        args = ("lvs", "--reportformat", "json", "-o", "lv_name")
        assert lv_rows(shell.run(*args, what="lvs")) == lv_rows(OneShot().run(*args, what="lvs"))
    finally:
        shell.close()


def test_a_killed_shell_is_replaced_and_closing_leaves_no_process():
    shell = LvmShell()
    shell.run("version", what="version")
    old = shell._proc
    os.kill(old.pid, signal.SIGKILL)
    old.wait()
    shell.run("version", what="version")  # a new shell, no error
    new = shell._proc
    assert new.pid != old.pid
    shell.close()
    assert new.poll() is not None


def test_a_shell_that_dies_mid_command_is_one_line_then_restarted(tmp_path, monkeypatch):
    fake = tmp_path / "lvm"  # reads one command and exits without a report
    fake.write_text("#!/bin/sh\nread line\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    shell = LvmShell()
    started = time.monotonic()
    with pytest.raises(LvmError) as exc:
        shell.run("lvs", what="listing LVs")
    assert time.monotonic() - started < 10
    assert exc.value.message.startswith("listing LVs: the lvm shell ended")
    assert "\n" not in exc.value.message
    assert shell._proc is None  # reaped; the next call starts another
    with pytest.raises(LvmError):
        shell.run("lvs", what="again")
    shell.close()


def test_arguments_the_shell_would_split_are_refused():
    shell = LvmShell()
    with pytest.raises(ValueError, match="would be split"):
        shell.run("lvs", "vg/a b", what="x")
    assert shell._proc is None  # nothing was started for it


def test_without_the_lvmdbusd_profile_one_process_per_command(tmp_path, monkeypatch):
    assert isinstance(open_runner(), LvmShell)
    conf = tmp_path / "lvm.conf"  # an lvm.conf whose profile folder is empty
    (tmp_path / "profiles").mkdir()
    conf.write_text(f'config {{\n    profile_dir = "{tmp_path / "profiles"}"\n}}\n')
    monkeypatch.setenv("LVM_SYSTEM_DIR", str(tmp_path))
    assert isinstance(open_runner(), OneShot)
