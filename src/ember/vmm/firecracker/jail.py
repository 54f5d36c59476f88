"""Where Firecracker sees its files: on the host, or inside an ember-jailer jail.

Every path the driver sends to Firecracker's API is a path *as Firecracker
sees it*. Run directly, that is the host path. Run through ``ember-jailer``
(Firecracker's jailer command line, :mod:`ember.jailer`), Firecracker lives in
``<chroot_base>/firecracker/<id>/root`` as an unprivileged uid, so each file
must be put into the jail first and named by its jail path, and the driver
reaches the sockets Firecracker creates through the jail directory.

* Before start, files are *placed* by the jailer: bind mounts in the VMM's
  private mount namespace (no same-file-system requirement), writable ones
  chowned to the jail uid.
* After start the jail's mount namespace is closed to us, so a container disk
  is hard-linked into ``/drives`` (same file system as the jail base, or a
  clear error) and chowned to the jail uid for as long as it is attached. A
  hard link keeps the inode, so the disk's virtio serial is what the host
  predicted from the original file.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from ember.errors import VMError


class DirectLayout:
    """Firecracker runs as a plain child process and sees host paths."""

    jailed = False

    def __init__(self, binary: str, work_dir: Path) -> None:
        self.binary = binary
        self.work_dir = work_dir
        self.api_socket = work_dir / "firecracker.sock"

    def argv(self, instance_id: str) -> list[str]:
        return [self.binary, "--api-sock", str(self.api_socket), "--id", instance_id]

    def place(self, host: Path, jail_path: str, writable: bool = False) -> str:
        """The API path for a file Firecracker opens (call before start)."""
        return str(host)

    def attach(self, host: Path) -> str:
        """The API path for a container disk attached to the running VM."""
        return str(host)

    def detach(self, api_path: str) -> None:
        pass

    def host_path(self, api_path: str) -> Path:
        return Path(api_path)

    def vsock(self, agent_socket: Path) -> tuple[str, Path]:
        """The hybrid vsock socket: (API path, host path)."""
        return str(agent_socket), agent_socket

    def own(self, path: Path) -> None:
        """Let the VMM write a file the driver created (it runs as the jail uid)."""

    def stage_dir(self, final_dir: Path) -> tuple[str, Path]:
        """Where Firecracker writes a snapshot: (API path, host path) of a folder."""
        return str(final_dir), final_dir

    def vmm_pid(self, proc: subprocess.Popen) -> int | None:
        return proc.pid

    @property
    def peer_uid(self) -> int | None:
        """The uid that must serve the sockets Firecracker creates (None: not checked)."""
        return None

    def collect(self, staged: Path, dest: Path) -> None:
        """Move a file Firecracker wrote (a snapshot) to its final place."""
        shutil.move(staged, dest)

    def cleanup(self) -> None:
        pass


class JailLayout(DirectLayout):
    """Firecracker runs under ember-jailer, in a chroot, as the jail's uid."""

    jailed = True

    def __init__(self, binary: str, work_dir: Path, template: object, vm_id: str,
                 tun: bool = False) -> None:
        from ember.jailer import api as jailer_api

        if not isinstance(template, jailer_api.JailSpec):
            raise VMError("VMSpec.jailer must be an ember.jailer.api.JailSpec")
        exe = shutil.which(binary) if os.sep not in binary else binary
        if not exe or not os.path.isfile(exe):
            raise VMError(f"Firecracker binary {binary!r} cannot be run (no such file); "
                          "set vm.firecracker_binary or EMBER_FIRECRACKER_BIN")
        super().__init__(os.path.abspath(exe), work_dir)
        self._api = jailer_api
        jail_id = re.sub(r"[^A-Za-z0-9-]", "-", vm_id)[:64]
        self.spec = dataclasses.replace(
            template, id=jail_id, exec_file=self.binary, vmm_kind="firecracker",
            args=["--api-sock", "/run/firecracker.sock"], daemonize=False, tun=tun,
            files=list(template.files), dirs=[*template.dirs, "/run", "/drives", "/snapshot"])
        self.root = jailer_api.jail_root(self.spec)
        self.api_socket = self.root / "run" / "firecracker.sock"
        self._attached: dict[str, tuple[Path, int, int]] = {}  # jail path → host, uid, gid

    def argv(self, instance_id: str) -> list[str]:
        return self._api.build_argv(self.spec)  # the jailer adds --id itself

    def place(self, host: Path, jail_path: str, writable: bool = False) -> str:
        self.spec.files.append(self._api.Placement(str(host), jail_path, "bind", writable))
        return jail_path

    def attach(self, host: Path) -> str:
        name = f"{host.stat().st_ino}-{host.name}"
        target = self.root / "drives" / name
        try:
            os.link(host, target)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise VMError(f"cannot put {host} into the Firecracker jail: it must be on the "
                              f"same file system as jailer.chroot_base_dir "
                              f"({self.spec.chroot_base_dir})") from None
            raise VMError(f"cannot put {host} into the Firecracker jail: {exc.strerror}") from None
        st = host.stat()
        self._attached[f"/drives/{name}"] = (host, st.st_uid, st.st_gid)
        os.chown(host, self.spec.uid, self.spec.gid)
        return f"/drives/{name}"

    def detach(self, api_path: str) -> None:
        owner = self._attached.pop(api_path, None)
        if owner is not None:
            host, uid, gid = owner
            try:
                os.chown(host, uid, gid)
            except OSError:
                pass
        self.host_path(api_path).unlink(missing_ok=True)

    def host_path(self, api_path: str) -> Path:
        return self.root / api_path.lstrip("/")

    def vsock(self, agent_socket: Path) -> tuple[str, Path]:
        return "/run/agent.sock", self.root / "run" / "agent.sock"

    def own(self, path: Path) -> None:
        os.chown(path, self.spec.uid, self.spec.gid)

    def stage_dir(self, final_dir: Path) -> tuple[str, Path]:
        return "/snapshot", self.root / "snapshot"

    def vmm_pid(self, proc: subprocess.Popen) -> int | None:
        return self._api.vmm_pid(self.spec)

    @property
    def peer_uid(self) -> int | None:
        return self.spec.uid

    def collect(self, staged: Path, dest: Path) -> None:
        """Take a file out of the VMM's reach first, then check it is one it wrote.

        The staging folder is Firecracker's: the name could be a symlink or a
        hard link to something else by now. Renamed into the root-owned jail
        folder it can no longer change, so the checks that follow hold.
        """
        hold = self._api.jail_dir(self.spec) / f".collect-{staged.name}"
        os.rename(staged, hold)
        st = os.lstat(hold)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != self.spec.uid:
            hold.unlink()
            raise VMError(f"{staged.name}: Firecracker left something other than a file it "
                          "wrote in its snapshot folder; refusing it")
        os.chown(hold, 0, 0)
        os.chmod(hold, 0o644)  # a later jailed restore reads it through a bind mount
        shutil.move(hold, dest)

    def kill_vmm(self) -> None:
        pid = self._api.vmm_pid(self.spec)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        for api_path in list(self._attached):
            self.detach(api_path)
        self._api.cleanup(self.spec)
