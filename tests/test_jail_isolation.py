"""The VMM cannot reach the control plane (issue 11, points 1, 2 and 8's tun).

A small static program plays the compromised VMM: run by ember-jailer with a
sandbox's uid, it tries what the security review did from inside QEMU's jail
(reach a host-only TCP service, listen on a host port, reach a host abstract
Unix socket, write where root reads). A real jailed `ember run` sandbox then
shows that nothing in the jail is writable by the VMM's uid, that the sandbox
folder is out of its reach, that QEMU sits in its own network, PID, IPC and
UTS namespaces, and that `ember rm -f` ignores a forged jail record.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from test_jailer import UID, env, jailer, make_spec  # noqa: F401 - env is a fixture
from test_jailer_support import wait_for

from ember.errors import VMError
from ember.jailer.api import Placement, build_argv, jail_dir, vmm_pid
from ember.vmm.peer import check_peer

pytestmark = pytest.mark.root

ATTACK_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <unistd.h>
/* One attack per run, named by the last argument; prints "OK" or the errno name. */
static int say(int ok) { printf("%s\n", ok ? "OK" : strerrorname_np(errno)); return 0; }
int main(int argc, char **argv) {
    const char *c = argv[argc - 2], *arg = argv[argc - 1];
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!strcmp(c, "tcp")) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(arg))};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        return say(s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0);
    }
    if (!strcmp(c, "listen")) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(arg))};
        int s = socket(AF_INET, SOCK_STREAM, 0), on = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
        int ok = bind(s, (struct sockaddr *)&a, sizeof a) == 0 && listen(s, 1) == 0;
        say(ok);
        if (ok) sleep(3);
        return 0;
    }
    if (!strcmp(c, "abstract")) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strncpy(a.sun_path + 1, arg, sizeof a.sun_path - 2);
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        return say(connect(s, (struct sockaddr *)&a,
                           offsetof(struct sockaddr_un, sun_path) + 1 + strlen(arg)) == 0);
    }
    if (!strcmp(c, "ids")) {
        struct utsname u;
        uname(&u);
        printf("pid %d host %s\n", getpid(), u.nodename);
        return 0;
    }
    if (!strcmp(c, "create")) return say(open(arg, O_CREAT | O_WRONLY, 0644) >= 0);
    if (!strcmp(c, "rdwr")) return say(open(arg, O_RDWR) >= 0);
    if (!strcmp(c, "chmod")) return say(chmod(arg, 0666) == 0);
    return 2;
}
"""


@pytest.fixture(scope="module")
def attack(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("attack")
    (d / "attack.c").write_text(ATTACK_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "attack"), str(d / "attack.c")],
                   check=True)
    return str(d / "attack")


def _run(env, attack: str, *args: str, seccomp: str = "off", kind: str = "qemu"):  # noqa: F811
    spec = make_spec(env, exec_file=attack, vmm_kind=kind, args=list(args), seccomp=seccomp,
                     kvm=False)
    res = jailer(env, spec)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture
def host_service():
    """A TCP service on the host's 127.0.0.1, as a host-only daemon would run."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


def test_host_loopback_service_is_unreachable(env, attack, host_service):  # noqa: F811
    # Seccomp off: the QEMU profile would kill socket(AF_INET) before the namespace
    # is even tried; this shows the second wall on its own.
    assert _run(env, attack, "tcp", str(host_service)) == "ENETUNREACH"


def test_a_port_the_vmm_listens_on_is_not_on_the_host(env, attack):  # noqa: F811
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = make_spec(env, exec_file=attack, vmm_kind="qemu", args=["listen", str(port)],
                     seccomp="off", kvm=False)
    proc = subprocess.Popen(build_argv(spec), stdout=subprocess.PIPE, text=True, env=env["env"])
    try:
        assert proc.stdout.readline().strip() == "OK"  # it listens, in its own namespace
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", port))
    finally:
        proc.kill()
        proc.wait()


def test_host_abstract_socket_is_unreachable_under_the_qemu_profile(env, attack):  # noqa: F811
    name = f"ember-test-{uuid.uuid4().hex[:8]}"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind("\0" + name)
    srv.listen(1)
    try:
        assert _run(env, attack, "abstract", name, seccomp="kill") == "ECONNREFUSED"
    finally:
        srv.close()


def test_vmm_is_pid_1_with_its_own_hostname_namespace(env, attack):  # noqa: F811
    assert _run(env, attack, "ids", "-").startswith("pid 1 host ")


@pytest.mark.parametrize("how", ["rdwr", "chmod"])
def test_a_template_ram_file_cannot_be_changed_from_the_jail(env, attack, tmp_path, how):  # noqa: F811
    """Shared template memory (issue 14): every restore maps the template's RAM
    file; the VMM gets it as a read-only bind of a root-owned 0444 file, so a
    VMM the guest took over cannot change what other sandboxes restore."""
    ram = tmp_path / "vm.state.ram"
    ram.write_bytes(b"template")
    ram.chmod(0o444)
    spec = make_spec(env, exec_file=attack, vmm_kind="qemu", args=[how, "/ram"], seccomp="off",
                     kvm=False, files=[Placement(str(ram), "/ram", "bind")])
    res = jailer(env, spec)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in ("EROFS", "EACCES")  # mount and mode refuse it both
    assert ram.read_bytes() == b"template" and ram.stat().st_mode & 0o777 == 0o444


def test_an_uncaught_forwarded_signal_still_ends_the_vmm(env):  # noqa: F811
    """PID 1 of a namespace ignores signals it has no handler for; the jailer
    turns a forwarded SIGTERM into SIGKILL then, and exits 128+SIGTERM."""
    spec = make_spec(env, args=["sleep", "30"], seccomp="off")
    proc = subprocess.Popen(build_argv(spec), env=env["env"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: vmm_pid(spec), timeout=15)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert not jail_dir(spec).exists()


def test_check_peer_refuses_a_socket_served_by_another_uid(tmp_path):
    path = tmp_path / "api.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    try:
        for uid, ok in ((UID, False), (os.getuid(), True), (None, True)):
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(path))
            if ok:
                check_peer(client, uid, "test socket")
                client.close()
            else:
                with pytest.raises(VMError, match=f"served by uid 0, not by the VMM's uid {UID}"):
                    check_peer(client, uid, "test socket")
    finally:
        srv.close()


def test_firecracker_snapshot_collect_refuses_links(tmp_path):
    """A jailed Firecracker's snapshot folder is its own: a symlink or a hard link
    left there in place of the snapshot is refused, nothing is followed."""
    from ember.jailer.api import JailSpec
    from ember.vmm.firecracker.jail import JailLayout

    binary = tmp_path / "firecracker"
    binary.write_text("")
    template = JailSpec(id="x", exec_file=str(binary), uid=UID, gid=UID,
                        chroot_base_dir=str(tmp_path / "jails"))
    layout = JailLayout(str(binary), tmp_path / "work", template, "vm-1")
    stage = layout.root / "snapshot"
    stage.mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("root only")
    (stage / "a.mem").symlink_to(secret)
    os.link(secret, stage / "b.mem")
    os.chown(stage / "b.mem", UID, UID, follow_symlinks=False)
    good = stage / "c.mem"
    good.write_text("memory")
    os.chown(good, UID, UID)
    dest = tmp_path / "templates"
    dest.mkdir()
    for name in ("a.mem", "b.mem"):
        with pytest.raises(VMError, match="something other than a file it wrote"):
            layout.collect(stage / name, dest / name)
        assert not (dest / name).exists()
    layout.collect(good, dest / "c.mem")
    st = (dest / "c.mem").stat()
    assert (dest / "c.mem").read_text() == "memory" and (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
    assert secret.read_text() == "root only"


def test_console_tail_does_not_follow_a_symlink(tmp_path):
    from ember.vmm.base import VMSpec
    from ember.vmm.qemu import QemuVMM

    secret = tmp_path / "secret"
    secret.write_text("PRIVATE KEY\n")
    work = tmp_path / "vm"
    work.mkdir()
    spec = VMSpec(vm_id="v", kernel=secret, initrd=secret, rootfs=secret, cmdline="",
                  work_dir=work)
    spec.console_log.symlink_to(secret)
    assert QemuVMM(spec).console_tail() == ""
    spec.console_log.unlink()
    spec.console_log.write_text("booted\n")
    assert QemuVMM(spec).console_tail() == "booted"


# --------------------------------------------------------- a real sandbox
def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@pytest.mark.vm
@pytest.mark.timeout(300)
def test_jailed_sandbox_is_cut_off_from_the_control_plane(ember_env, image, tmp_path):
    proc = ember_env.run("run", "-d", image, "sleep", "300")
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.decode().strip()
    decoy = tmp_path / "decoy"
    try:
        info = json.loads(ember_env.run("inspect", sid, check=True).stdout)[0]
        pid, jail = info["vmm_pid"], info["jail"]
        uid = jail["uid"]
        root = Path(os.readlink(f"/proc/{pid}/root"))
        # Nothing in the jail is QEMU's to write: its channels came as descriptors.
        owned = [str(p) for p in [root, *root.rglob("*")] if os.lstat(p).st_uid == uid]
        assert owned == []
        assert not (root / "dev" / "net" / "tun").exists()
        assert not (Path(f"/proc/{pid}/root") / "dev/net/tun").exists()
        # The sandbox folder (record, sockets, logs) belongs to root alone.
        sdir = ember_env.state_dir / "sandboxes" / sid
        for p in [sdir, *sdir.iterdir()]:
            assert os.lstat(p).st_uid == 0, p
        # QEMU's own namespaces: an empty network (lo only, down), PID, IPC, UTS.
        for kind in ("net", "pid", "ipc", "uts", "mnt"):
            assert _ns(pid, kind) != _ns("self", kind), kind
        links = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
        assert len(links) == 1 and ": lo:" in links[0] and "state DOWN" in links[0]
        out = ember_env.run("exec", sid, "echo", "alive", check=True).stdout
        assert out == b"alive\n"
        # A forged jail record (the old attack) must not steer what `rm -f` removes.
        victim = decoy / "qemu-system-x86_64" / "victim"
        victim.mkdir(parents=True)
        (victim / "keep").write_text("root's data")
        record = sdir / "state.json"
        data = json.loads(record.read_text())
        data["jail"] = {**data["jail"], "id": "victim", "chroot_base_dir": str(decoy)}
        record.write_text(json.dumps(data))
    finally:
        ember_env.run("rm", "-f", sid)
    assert (decoy / "qemu-system-x86_64" / "victim" / "keep").read_text() == "root's data"
    assert not Path(f"/proc/{pid}").exists() or "qemu" not in Path(f"/proc/{pid}/comm").read_text()
    assert not root.parent.exists()


@pytest.mark.vm
@pytest.mark.timeout(300)
def test_nothing_a_sandbox_keeps_is_readable_by_another_user(ember_env, image):
    """Issue 11 point 4: record, logs, console, disks, images and templates are
    root-only, checked as the user `nobody` would try (find -readable)."""
    os.chmod(ember_env.state_dir, 0o755)  # as /run/ember is on a standard host
    proc = ember_env.run("run", "-d", image, "sh", "-c", "echo SECRET; sleep 300")
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.decode().strip()
    try:
        wait_for(lambda: b"SECRET" in ember_env.run("logs", sid).stdout, timeout=60)
        cfg = ember_env.cfg()
        roots = [cfg.sandboxes_dir, cfg.images_dir, cfg.rootfs_dir, cfg.templates_dir,
                 cfg.disks_dir]
        assert (cfg.sandboxes_dir / sid / "container.log").exists()
        found = subprocess.run(["runuser", "-u", "nobody", "--", "find", *map(str, roots),
                                "-readable"], capture_output=True, text=True)
        assert found.stdout.split() == [], found.stdout
        for root in roots:
            assert root.stat().st_mode & 0o077 == 0, root
    finally:
        ember_env.run("rm", "-f", sid)
