"""A private containerd 1.6 for tests: own root, state, socket and config.

    with ContainerdInstance(tmp_path / "ctrd", proxy_snapshotter("ember", sock)) as c:
        c.ctr("images", "import", "--snapshotter", "ember", "image.tar")

``extra_config`` is TOML appended to the generated config (version 2), for
``[proxy_plugins.X]``, runtimes under ``[plugins."io.containerd.grpc.v1.cri"...]``
and the like; :func:`proxy_snapshotter` and :func:`runtime_v2` write the usual
snippets. The CRI plugin is disabled unless ``cri=True`` (it needs more set-up
than most tests want). :meth:`stop` kills containerd and the shims it started
and undoes every mount and loop device under the instance's folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from ember_testing.mounts import cleanup_under

CONTAINERD = os.environ.get("EMBER_TEST_CONTAINERD", "containerd")
CTR = os.environ.get("EMBER_TEST_CTR", "ctr")


def proxy_snapshotter(name: str, address: str | os.PathLike) -> str:
    """The ``proxy_plugins`` snippet registering a gRPC snapshotter."""
    return f'\n[proxy_plugins.{name}]\n  type = "snapshot"\n  address = "{address}"\n'


def runtime_v2(name: str, runtime_type: str, options: str = "") -> str:
    """A CRI runtime handler ``name`` using shim ``runtime_type`` (needs cri=True)."""
    table = f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{name}]'
    return f'\n{table}\n  runtime_type = "{runtime_type}"\n{options}\n'


class ContainerdError(RuntimeError):
    """containerd did not start, or a ctr command failed."""


class ContainerdInstance:
    """One containerd process and everything it owns, under ``tmpdir``."""

    def __init__(self, tmpdir: str | os.PathLike, extra_config: str = "", *,
                 namespace: str = "ember-test", cri: bool = False,
                 env: dict[str, str] | None = None, start_timeout: float = 30.0) -> None:
        self.dir = Path(tmpdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.namespace = namespace
        self.address = str(self.dir / "containerd.sock")
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        disabled = [] if cri else ['"io.containerd.grpc.v1.cri"']
        self.config_path.write_text(
            f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
            f"disabled_plugins = [{', '.join(disabled)}]\n"
            f'[grpc]\n  address = "{self.address}"\n'
            f'[debug]\n  level = "info"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.dir}/opt"\n'
            + extra_config)
        self.proc: subprocess.Popen | None = None
        self._start(env, start_timeout)

    def _start(self, env: dict[str, str] | None, timeout: float) -> None:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config_path)], stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **(env or {})})
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise ContainerdError(f"containerd exited at start:\n{self.log_tail()}")
            if os.path.exists(self.address) and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise ContainerdError(f"containerd did not answer in {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ctr(self, *args: str, check: bool = True, timeout: float = 300,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``ctr --address ... --namespace ... ARGS``; text output."""
        cmd = [CTR, "--address", self.address, "--namespace", self.namespace, *args]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input,
                              check=False)
        out = subprocess.CompletedProcess(cmd, proc.returncode,
                                          proc.stdout.decode(errors="replace"),
                                          proc.stderr.decode(errors="replace"))
        if check and out.returncode != 0:
            raise ContainerdError(f"{' '.join(args)} failed ({out.returncode}): "
                                  f"{out.stderr.strip() or out.stdout.strip()}")
        return out

    def _shims(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "-address" in cmd and self.address in cmd and p.pid != os.getpid():
                found.append(p)
        return found

    def stop(self) -> list[str]:
        """Kill containerd and its shims, then undo mounts and loop devices.

        Returns what was left mounted or attached under the folder (cleaned).
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for shim in self._shims():
            try:
                for child in shim.children(recursive=True):
                    child.kill()
                shim.kill()
            except psutil.Error:
                pass
        return cleanup_under(self.dir)

    def __enter__(self) -> ContainerdInstance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
