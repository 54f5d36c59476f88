"""ember-jailer on small programs: confinement, seccomp, cgroups, files, failures.

The jailed "VMMs" here are static busybox and a libc-free C program (whose
only syscalls are the ones it spells out), so each test takes well under a
second or two; tests/test_jailer_qemu.py does the same with a real QEMU boot.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest
from test_jailer_support import cgroup_leaves, remove_cgroup_parent, status, wait_for

from ember.errors import EmberError
from ember.jailer import cgroups, profiles
from ember.jailer.api import JailSpec, Placement, build_argv, cleanup, jail_dir, jail_root, vmm_pid
from ember.jailer.main import parse

UID = GID = 4242
PROG_C = r"""
static long sys3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile ("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c)
                      : "rcx", "r11", "memory");
    return r;
}
void _start(void) {
    sys3(1, 1, (long)"before\n", 7);   /* write */
    sys3(110, 0, 0, 0);                 /* getppid: not on the tiny list */
    sys3(1, 1, (long)"after\n", 6);
    sys3(60, 0, 0, 0);                  /* exit */
}
"""

pytestmark = pytest.mark.root


@pytest.fixture
def env(tmp_path):
    """A chroot base, a unique parent cgroup and a config; all removed afterwards."""
    with jail_env(tmp_path) as holder:
        yield holder


@contextlib.contextmanager
def jail_env(tmp_path: Path):
    """What the env fixture gives, for other modules' fixtures too."""
    base = Path(tempfile.mkdtemp(prefix="jl-", dir="/tmp"))
    parent = f"ember-test-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "config.toml"
    config.write_text("[jailer]\nallow_root = false\n")
    holder = {"base": base, "parent": parent, "specs": [],
              "env": {**os.environ, "EMBER_CONFIG": str(config)}, "tmp": tmp_path}
    try:
        yield holder
    finally:
        for spec in holder["specs"]:
            pid = vmm_pid(spec)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            cleanup(spec)
        remove_cgroup_parent(parent)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def busybox_list(env) -> str:
    """The generic VMM list plus the set*id calls busybox makes at start-up."""
    path = env["tmp"] / "busybox.list"
    path.write_text(" ".join(profiles.syscalls_for("generic") + ["setuid", "setgid"]))
    return str(path)


def make_spec(env, **kw) -> JailSpec:
    kw.setdefault("id", f"t-{uuid.uuid4().hex[:10]}")
    kw.setdefault("exec_file", "/bin/busybox")
    spec = JailSpec(uid=UID, gid=GID, chroot_base_dir=str(env["base"]),
                    parent_cgroup=env["parent"], **kw)
    env["specs"].append(spec)
    return spec


def jailer(env, spec_or_argv, timeout: float = 30) -> subprocess.CompletedProcess:
    argv = spec_or_argv if isinstance(spec_or_argv, list) else build_argv(spec_or_argv)
    return subprocess.run(argv, capture_output=True, text=True, env=env["env"], timeout=timeout)


@pytest.fixture(scope="module")
def prog(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("prog")
    (d / "prog.c").write_text(PROG_C)
    subprocess.run(["gcc", "-static", "-nostdlib", "-O2", "-o", str(d / "prog"), str(d / "prog.c")],
                   check=True)
    return str(d / "prog")


def test_build_argv_and_parse_agree():
    spec = JailSpec(id="vm-1", exec_file="/usr/bin/qemu-system-x86_64", uid=1000, gid=1001,
                    args=["-M", "microvm", "--", "x"], chroot_base_dir="/srv/j", netns="/run/netns/a",
                    daemonize=True, new_pid_ns=True, cgroups={"memory.max": "1G", "pids.max": "9"},
                    cgroup_version=2, parent_cgroup="ember/pods", resource_limits={"no-file": 99},
                    files=[Placement("/a:b/k", "/vmlinuz", "hardlink"),
                           Placement("/d", "/run", "bind", True)],
                    dirs=["/sock"], seccomp="log", vmm_kind="qemu", kvm=False, keep_fds=[3, 7])
    argv = build_argv(spec)
    assert argv[argv.index("--") + 1:] == spec.args
    again = parse(argv[1:])
    spec.jailer_binary = None
    assert again == spec
    assert jail_root(spec) == Path("/srv/j/qemu-system-x86_64/vm-1/root")


def test_seccomp_kill_stops_a_syscall_outside_the_list(env, prog):
    allow = env["tmp"] / "tiny.list"
    allow.write_text("# the program's own calls\nwrite exit\n")
    spec = make_spec(env, exec_file=prog, seccomp="kill", seccomp_allow_file=str(allow))
    res = jailer(env, spec)
    assert res.stdout == "before\n"
    assert res.returncode == 128 + signal.SIGSYS
    assert not jail_dir(spec).exists()


def test_seccomp_log_lets_the_syscall_through(env, prog):
    allow = env["tmp"] / "tiny.list"
    allow.write_text("write exit\n")
    spec = make_spec(env, exec_file=prog, seccomp="log", seccomp_allow_file=str(allow))
    res = jailer(env, spec)
    assert (res.returncode, res.stdout) == (0, "before\nafter\n")


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@pytest.mark.skipif(cgroups.v1_mount("memory") is None, reason="needs cgroup v1 memory")
def test_jailed_process_is_confined_v1(env):
    spec = make_spec(env, args=["sleep", "3"], new_pid_ns=True, seccomp_allow_file=busybox_list(env),
                     cgroups={"memory.limit_in_bytes": str(64 << 20), "pids.max": "50"},
                     cgroup_version=1, resource_limits={"no-file": 128})
    proc = subprocess.Popen(build_argv(spec), env=env["env"], stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for(lambda: vmm_pid(spec), timeout=15)
        st = status(pid)
        assert st["Uid"].split() == [str(UID)] * 4 and st["Gid"].split() == [str(GID)] * 4
        assert st["Groups"] == ""
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == 0, cap
        assert (st["NoNewPrivs"], st["Seccomp"]) == ("1", "2")
        assert os.readlink(f"/proc/{pid}/root") == str(jail_root(spec))
        assert _ns(pid, "mnt") != _ns("self", "mnt")
        assert _ns(pid, "pid") != _ns("self", "pid")
        assert st["NSpid"].split()[-1] == "1"
        own = Path(f"/proc/{pid}/cgroup").read_text()
        leaf = f"{env['parent']}/{spec.id}"
        assert f":memory:/{leaf}\n" in own and f":pids:/{leaf}\n" in own
        assert (cgroups.v1_mount("memory") / leaf / "memory.limit_in_bytes").read_text() == \
            f"{64 << 20}\n"
        assert (cgroups.v1_mount("pids") / leaf / "pids.max").read_text() == "50\n"
        assert "Max open files            128" in Path(f"/proc/{pid}/limits").read_text()
        assert sorted(os.listdir(jail_root(spec) / "dev")) == []  # nodes live in its tmpfs only
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert not jail_dir(spec).exists()
    assert cgroup_leaves(env["parent"], spec.id) == []


@pytest.mark.skipif(cgroups.v2_mount() is None, reason="needs a cgroup2 mount")
def test_cgroup_v2(env):
    spec = make_spec(env, args=["sleep", "2"], cgroup_version=2, seccomp="off",
                     cgroups={"cgroup.max.descendants": "3"})
    proc = subprocess.Popen(build_argv(spec), env=env["env"])
    try:
        pid = wait_for(lambda: vmm_pid(spec), timeout=15)
        leaf = cgroups.v2_mount() / env["parent"] / spec.id
        assert f"0::/{env['parent']}/{spec.id}\n" in Path(f"/proc/{pid}/cgroup").read_text()
        assert (leaf / "cgroup.max.descendants").read_text() == "3\n"
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
    assert cgroup_leaves(env["parent"], spec.id) == []


def test_files_hardlink_copy_bind(env):
    src = env["tmp"] / "in"
    src.mkdir()
    (src / "data").write_text("host data\n")
    out = env["tmp"] / "out"
    out.mkdir()
    kernel = env["tmp"] / "kernel"
    kernel.write_text("kernel bytes\n")
    script = ("/busybox cat /k /c /in/data; echo written > /out/result; "
              "(echo x > /in/data) 2>/dev/null || echo RO-OK; "
              "(echo x > /k) 2>/dev/null || echo LINK-RO-OK; /busybox ls -ldn /sock")
    spec = make_spec(env, args=["sh", "-c", script], seccomp="off",
                     files=[Placement(str(kernel), "/k", "hardlink"),
                            Placement(str(kernel), "/c", "copy"),
                            Placement(str(src), "/in", "bind"),
                            Placement(str(out), "/out", "bind", writable=True)],
                     dirs=["/sock"])
    res = jailer(env, spec)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:5] == ["kernel bytes", "kernel bytes", "host data", "RO-OK", "LINK-RO-OK"]
    assert f" {UID} " in lines[5]  # /sock owned by the jail uid
    assert (out / "result").read_text() == "written\n"
    assert (out / "result").stat().st_uid == UID
    assert (src / "data").read_text() == "host data\n"
    assert kernel.exists() and not jail_dir(spec).exists()


def test_daemonize_then_sigterm_removes_the_jail(env):
    spec = make_spec(env, args=["sleep", "30"], daemonize=True, seccomp="off")
    res = jailer(env, spec)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stderr
    pid = vmm_pid(spec)
    supervisor = int((jail_dir(spec) / "jailer.pid").read_text())
    assert status(pid)["PPid"] == str(supervisor)
    assert os.getsid(supervisor) == supervisor  # detached into its own session
    # What stays resident per sandbox is the lean stdlib-only waiter, not the jailer.
    # (the jailer execs it right after the VMM starts: give that a moment)
    wait_for(lambda: int(status(supervisor)["RssAnon"].split()[0]) < 8 * 1024, timeout=5)
    os.kill(supervisor, signal.SIGTERM)  # forwarded to the VMM, then the jail goes
    wait_for(lambda: not jail_dir(spec).exists(), timeout=10)
    assert not Path(f"/proc/{pid}").exists()


def test_vmm_dies_with_a_killed_jailer_and_cleanup_is_idempotent(env):
    spec = make_spec(env, args=["sleep", "30"], cgroups={"pids.max": "10"}, seccomp="off")
    proc = subprocess.Popen(build_argv(spec), env=env["env"])
    pid = wait_for(lambda: vmm_pid(spec), timeout=15)
    proc.kill()
    proc.wait()
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or status(pid)["State"].startswith("Z"),
             timeout=10)
    assert jail_dir(spec).exists() and cgroup_leaves(env["parent"], spec.id)
    cleanup(spec)
    assert not jail_dir(spec).exists() and cgroup_leaves(env["parent"], spec.id) == []
    cleanup(spec)


def test_uid_0_runs_when_the_config_allows_it(env):
    env["env"]["EMBER_CONFIG"] = str(env["tmp"] / "root.toml")
    (env["tmp"] / "root.toml").write_text("[jailer]\nallow_root = true\n")
    spec = make_spec(env, args=["true"], seccomp_allow_file=busybox_list(env))
    spec.uid = spec.gid = 0
    assert jailer(env, spec).returncode == 0


def _bad_cases(tmp: Path):
    notns = tmp / "not-a-netns"
    notns.write_text("")
    badlist = tmp / "bad.list"
    badlist.write_text("write no_such_syscall\n")
    return {
        "missing flag": (["--id", "x1", "--exec-file", "/bin/busybox", "--gid", "5"], "--uid"),
        "id with slash": ({"id": "a/b"}, "--id"),
        "missing exec file": ({"exec_file": "/no/such/vmm"}, "no such file"),
        "uid 0 forbidden": ({"uid": 0}, "forbidden"),
        "missing cgroup file": ({"cgroups": {"pids.max": "5", "memory.no_such_knob": "1"}},
                                "memory.no_such_knob"),
        "missing placed file": ({"files": [Placement("/no/such/kernel", "/k")]}, "/no/such/kernel"),
        "placed under /dev": ({"files": [Placement("/bin/busybox", "/dev/x")]}, "/dev"),
        "jail path escaping": ({"dirs": ["/a/../../b"]}, ".."),
        "fd that is not open": ({"keep_fds": [987]}, "--keep-fd 987"),
        "unknown syscall": ({"seccomp_allow_file": str(badlist)}, "no_such_syscall"),
        "netns that is not one": ({"netns": str(notns), "cgroups": {"pids.max": "5"}}, "setns"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(Path(tempfile.gettempdir())).keys()))
def test_bad_arguments_fail_cleanly(env, case):
    what, expected = _bad_cases(env["tmp"])[case]
    if isinstance(what, list):
        argv = [build_argv(make_spec(env))[0], *what, "--chroot-base-dir", str(env["base"])]
        spec_id = "x1"
    else:
        spec = make_spec(env, args=["true"])
        for key, value in what.items():
            setattr(spec, key, value)
        argv, spec_id = build_argv(spec), spec.id
    res = jailer(env, argv)
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("ember-jailer: "), res.stderr
    assert expected in res.stderr
    assert os.listdir(env["base"]) == []  # not even <base>/<exec name>
    assert cgroup_leaves(env["parent"], spec_id) == []
    assert cgroup_leaves("", env["parent"]) == []  # nor the parent cgroup


def test_existing_jail_is_refused_and_left_alone(env):
    spec = make_spec(env, args=["true"])
    jail_root(spec).mkdir(parents=True)
    (jail_root(spec) / "keep").write_text("x")
    res = jailer(env, spec)
    assert res.returncode != 0 and "already exists" in res.stderr
    assert (jail_root(spec) / "keep").exists()


def test_cleanup_stops_a_running_vmm(env):
    spec = make_spec(env, args=["sleep", "30"], seccomp="off", daemonize=True)
    assert jailer(env, spec).returncode == 0
    pid = vmm_pid(spec)
    cleanup(spec)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
    assert not jail_dir(spec).exists()


def test_spec_from_config_and_uid_allocation():
    from ember.config import Config
    from ember.jailer.api import allocate_uid, spec_from_config

    cfg = Config()
    cfg.jailer.uid_base, cfg.jailer.uid_count = 200000, 1
    assert allocate_uid(cfg.jailer, "sandbox-a") == 200000
    spec = spec_from_config(cfg, id="a", exec_file="/bin/true", uid=1, gid=1)
    assert (spec.chroot_base_dir, spec.seccomp, spec.parent_cgroup) == ("/srv/jailer", "kill", "ember")
    assert spec.cgroup_version is None
    # A uid some running process has is taken (a VMM could signal it), listed or not.
    busy = subprocess.Popen(["setpriv", "--reuid", "1879113000", "--regid", "1879113000",
                             "--clear-groups", "sleep", "30"])
    try:
        wait_for(lambda: psutil.Process(busy.pid).uids().real == 1879113000, timeout=10)
        cfg.jailer.uid_base = 1879113000
        with pytest.raises(EmberError, match="no free jailer uid"):
            allocate_uid(cfg.jailer, "sandbox-b")
    finally:
        busy.kill()
        busy.wait()


def _etc(tmp_path: Path, **files: str) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    for name, text in files.items():
        (etc / name).write_text(text)
    return etc


def test_uid_allocation_skips_ids_the_host_uses_or_delegates(tmp_path):
    """Users, groups (the uid is the gid too) and subuid/subgid ranges are never handed out."""
    from ember.config import JailerConfig
    from ember.jailer.api import allocate_uid

    etc = _etc(tmp_path,
               passwd="root:x:0:0::/root:/bin/sh\nalice:x:300000:300000::/home/a:/bin/sh\n",
               group="root:x:0:\nbuilders:x:300001:\n",
               subuid="alice:300002:2\n# comment\nbroken-line\n",
               subgid="alice:300004:1\n")
    jcfg = JailerConfig(uid_base=300000, uid_count=6)
    got = {allocate_uid(jcfg, f"sandbox-{i}", etc=etc) for i in range(50)}
    assert got == {300005}  # 300000 user, 300001 group, 300002-3 subuid, 300004 subgid
    (etc / "subuid").write_text("alice:300002:2\nbob:300005:1\n")  # delegated since
    with pytest.raises(EmberError, match=r"no free jailer uid left in \[300000, 300006\).*subuid"):
        allocate_uid(jcfg, "sandbox-x", etc=etc)


def test_default_uid_range_avoids_the_distribution_defaults():
    """Debian's first subuid range (100000-165535, then +65536 each) and systemd's ranges."""
    from ember.config import JailerConfig
    from ember.jailer.api import allocate_uid
    from ember.jailer.uids import reserved_ids

    jcfg = JailerConfig()
    lo, hi = jcfg.uid_base, jcfg.uid_base + jcfg.uid_count
    assert lo >= 0x70000000 and hi <= 0x7FFE0000 and hi < 2**31
    debian = [(100000 + n * 65536, 165536 + n * 65536) for n in range(10000)]
    assert not any(a < hi and lo < b for a, b in debian)
    uid = allocate_uid(jcfg, "sandbox-default")
    assert lo <= uid < hi and uid not in reserved_ids("/etc")


@pytest.mark.parametrize("base,count", [(0, 10), (10, 0), (0xFFFFFFFE, 2)])
def test_uid_range_must_be_valid(base, count):
    from ember.config import JailerConfig
    from ember.jailer.api import allocate_uid

    with pytest.raises(EmberError, match="the range must lie within"):
        allocate_uid(JailerConfig(uid_base=base, uid_count=count), "x")


def test_a_dynamic_binary_gets_its_libraries(env):
    spec = make_spec(env, exec_file="/usr/bin/true")  # glibc, ld.so, no ld.so.cache in the jail
    res = jailer(env, spec)
    assert res.returncode == 0, res.stderr
    cache = env["base"] / ".libs-true.json"
    assert "/libc.so.6" in cache.read_text()


def test_library_cache_is_reused_until_the_binary_changes(tmp_path, monkeypatch):
    from ember.jailer import files

    binary = tmp_path / "true"
    binary.write_bytes(Path("/usr/bin/true").read_bytes())
    cache = files.LibraryCache(tmp_path / "libs.json")
    libs = cache.libraries(str(binary))
    assert any(p.endswith("/libc.so.6") for p in libs)
    cache.save()
    calls = []
    real = files._ldd
    monkeypatch.setattr(files, "_ldd", lambda b: calls.append(b) or real(b))
    assert files.LibraryCache(tmp_path / "libs.json").libraries(str(binary)) == libs
    assert calls == []
    binary.unlink()
    binary.write_bytes(Path("/usr/bin/true").read_bytes())  # new inode: an upgrade
    assert files.LibraryCache(tmp_path / "libs.json").libraries(str(binary)) == libs
    assert len(calls) == 1


FAKE_FC_C = r"""
#include <stdio.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>
/* Stands in for the Firecracker binary this machine cannot run: reports what
   Firecracker would find in its jail. */
int main(int argc, char **argv) {
    struct stat kvm, tun;
    for (int i = 0; i < argc; i++) printf("%s ", argv[i]);
    printf("\n");
    if (stat("/dev/kvm", &kvm) == 0)
        printf("kvm %u:%u uid %u\n", major(kvm.st_rdev), minor(kvm.st_rdev), kvm.st_uid);
    if (stat("/dev/net/tun", &tun) == 0) printf("tun %u:%u\n", major(tun.st_rdev), minor(tun.st_rdev));
    printf("uid %u\n", getuid());
    return 0;
}
"""


@pytest.mark.parametrize("tun", [False, True])
def test_firecracker_kind_gets_its_id_kvm_and_tun_only_when_asked(env, tmp_path, tun):
    """/dev/net/tun exists only in a jail whose VMM opens a tap by name (--tun)."""
    src = tmp_path / "fc.c"
    src.write_text(FAKE_FC_C)
    binary = tmp_path / "firecracker"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(src)], check=True)
    spec = make_spec(env, exec_file=str(binary), vmm_kind="firecracker",
                     args=["--api-sock", "/run/api.sock"], tun=tun)
    res = jailer(env, spec)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["/firecracker", "--id", spec.id, "--api-sock", "/run/api.sock"]
    assert f"kvm 10:232 uid {UID}" in lines
    assert ("tun 10:200" in lines) == tun
    assert lines[-1] == f"uid {UID}"


def test_kvm_node_only_when_qemu_asks_for_kvm():
    from ember.jailer.jail import _wants_kvm

    def qemu(*args):
        return JailSpec(id="k", exec_file="/usr/bin/qemu-system-x86_64", uid=1, gid=1,
                        vmm_kind="qemu", args=list(args))

    assert not _wants_kvm(qemu("-accel", "tcg"))
    assert _wants_kvm(qemu("-accel", "kvm"))
    assert _wants_kvm(qemu("-M", "microvm,accel=kvm"))
    assert _wants_kvm(qemu("-enable-kvm"))
    spec = qemu("-accel", "kvm")
    spec.kvm = False
    assert not _wants_kvm(spec)


def test_place_picks_unique_jail_paths():
    spec = JailSpec(id="p", exec_file="/bin/true", uid=1, gid=1)
    assert spec.place("/a/vmlinuz") == "/vmlinuz"
    assert spec.place("/b/vmlinuz", "copy") == "/2-vmlinuz"
    assert spec.place("/run/ember/sb1/", "bind", writable=True, jail_path="/run") == "/run"
    assert spec.files[-1] == Placement("/run/ember/sb1/", "/run", "bind", True)


def test_keep_fd_passes_an_open_file_to_the_vmm(env):
    data = env["tmp"] / "snapshot"
    data.write_text("state bytes\n")
    fd = os.open(data, os.O_RDONLY)
    try:
        spec = make_spec(env, args=["sh", "-c", f"/busybox cat <&{fd}"], keep_fds=[fd],
                         seccomp="off")
        res = subprocess.run(build_argv(spec), capture_output=True, text=True,
                             env=env["env"], pass_fds=(fd,), timeout=30)
    finally:
        os.close(fd)
    assert (res.returncode, res.stdout) == (0, "state bytes\n"), res.stderr


PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/if_packet.h>
#include <linux/io_uring.h>
#include <linux/sched.h>
/* Makes the one call named by its last argument (Firecracker gets --id first) under the VMM's seccomp profile and
   prints "<ret> <errno name>"; a call the filter kills prints nothing. */
static void *thread(void *arg) { return arg; }
static void report(long ret) {
    printf("%ld %s\n", ret < 0 ? -1L : 0L, ret < 0 ? strerrorname_np(errno) : "OK");
}
int main(int argc, char **argv) {
    const char *c = argv[argc - 1];
    struct io_uring_params params = {0};
    struct clone_args cargs = {.exit_signal = SIGCHLD};
    int fds[2], on = 1;
    char buf[128] = {0};
    long r;
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!strcmp(c, "io_uring_setup")) report(syscall(SYS_io_uring_setup, 4, &params));
    else if (!strcmp(c, "io_uring_enter")) report(syscall(SYS_io_uring_enter, 0, 1, 0, 0, NULL, 0));
    else if (!strcmp(c, "clone-newnet") || !strcmp(c, "clone-newuser") || !strcmp(c, "clone")) {
        long flags = SIGCHLD | (c[5] ? (c[9] == 'n' ? CLONE_NEWNET : CLONE_NEWUSER) : 0);
        r = syscall(SYS_clone, flags, 0, 0, 0, 0);
        if (r == 0) _exit(0);
        report(r);
    }
    else if (!strcmp(c, "clone3")) report(syscall(SYS_clone3, &cargs, sizeof cargs));
    else if (!strcmp(c, "pthread")) {  /* glibc: clone3, then clone on ENOSYS */
        pthread_t t;
        void *out = NULL;
        errno = pthread_create(&t, NULL, thread, &on);
        report(errno ? -1 : pthread_join(t, &out) || out != &on ? -1 : 0);
    }
    else if (!strcmp(c, "unix")) report(socket(AF_UNIX, SOCK_STREAM, 0));
    else if (!strcmp(c, "socketpair")) report(socketpair(AF_UNIX, SOCK_STREAM, 0, fds));
    else if (!strcmp(c, "inet")) report(socket(AF_INET, SOCK_STREAM, 0));
    else if (!strcmp(c, "inet6")) report(socket(AF_INET6, SOCK_DGRAM, 0));
    else if (!strcmp(c, "netlink")) report(socket(AF_NETLINK, SOCK_RAW, 0));
    else if (!strcmp(c, "packet")) report(socket(AF_PACKET, SOCK_RAW, 0));
    else if (!strcmp(c, "socketpair-inet")) report(socketpair(AF_INET, SOCK_STREAM, 0, fds));
    else if (!strcmp(c, "TCGETS")) report(ioctl(0, TCGETS, buf));  /* not a tty: ENOTTY */
    else if (!strcmp(c, "FIONBIO")) report(ioctl(1, FIONBIO, &on));
    else if (!strcmp(c, "TIOCSTI")) report(ioctl(0, TIOCSTI, "x"));
    else if (!strcmp(c, "SIOCGIFFLAGS")) report(ioctl(1, SIOCGIFFLAGS, buf));
    else if (!strcmp(c, "LOOP_CTL_GET_FREE")) report(ioctl(0, 0x4C82, 0));
    else return 2;
    return 0;
}
"""

KILLED = "killed"


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", str(d / "probe"), str(d / "probe.c")],
                   check=True)
    return str(d / "probe")


@pytest.mark.parametrize("kind", ["qemu", "firecracker"])
@pytest.mark.parametrize("call, expected", [
    # io_uring: refused, so its in-kernel openat/mkdirat/renameat... cannot bypass the list
    ("io_uring_setup", "-1 EPERM"),
    ("io_uring_enter", "-1 EPERM"),
    # clone: no namespace flags; clone3 ENOSYS so that glibc threads fall back to clone
    ("clone-newnet", KILLED),
    ("clone-newuser", KILLED),
    ("clone", "0 OK"),
    ("clone3", "-1 ENOSYS"),
    ("pthread", "0 OK"),
    # socket: AF_UNIX only
    ("unix", "0 OK"),
    ("socketpair", "0 OK"),
    ("netlink", KILLED),
    ("packet", KILLED),
    ("inet", KILLED),
    ("inet6", KILLED),
    ("socketpair-inet", KILLED),
    # ioctl: KVM, TUN, block and a few terminal requests only
    ("TCGETS", "-1 ENOTTY"),
    ("FIONBIO", "0 OK"),
    ("TIOCSTI", KILLED),
    ("SIOCGIFFLAGS", KILLED),
    ("LOOP_CTL_GET_FREE", KILLED),
])
def test_seccomp_argument_rules(env, probe, kind, call, expected):
    """Each rule of the VMM profiles, under the jail: the refused form is killed
    (SIGSYS) or fails with its errno; the allowed form still works."""
    spec = make_spec(env, exec_file=probe, vmm_kind=kind, args=[call], kvm=False)
    res = subprocess.run(build_argv(spec), capture_output=True, text=True, env=env["env"],
                         stdin=subprocess.DEVNULL, timeout=30)
    if expected == KILLED:
        assert (res.returncode, res.stdout) == (128 + signal.SIGSYS, ""), res.stderr
    else:
        assert (res.returncode, res.stdout) == (0, expected + "\n"), res.stderr


def test_an_unknown_vmm_kind_is_one_line_and_makes_nothing(env) -> None:
    """A kind with no VmmProfile is refused before any jail folder exists."""
    from ember.jailer.jail import validate

    spec = make_spec(env, vmm_kind="bochs")
    with pytest.raises(EmberError, match=r"--vmm-kind 'bochs': one of qemu, firecracker, generic"):
        validate(spec, allow_root=False)
    assert not jail_dir(spec).exists()
    assert set(profiles.PROFILES) == {"qemu", "firecracker", "generic"}
