"""Idle sandboxes hold less host memory (issue 14, point 4).

* The jailed QEMU runs without transparent huge pages (inherited through the
  jailer), so a restored guest's scattered pages do not each cost 2 MiB.
* The guest zeroes pages it frees (init_on_free), so they travel in the
  template snapshot as zero pages and a restore never makes them resident.
* A guest told its TSC rate runs without a PIT, whose tick woke it idle; nor
  does kcompactd or the soft-lockup watchdog wake it.
* A restored VMM is not given the kernel and initrd, which QEMU would keep
  in its own memory for the VM's life.
* The TCG translation cache is capped (tb-size) at the configured size
  (``[vm] tcg_tb_size_mib``, default 32 MiB).
* Sandboxes restored from one template share its RAM (a file mapped
  copy-on-write) until they write it, and none of them can change it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from test_jailer_support import status

from ember.vmm.qemu.snapshot import can_share_ram

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(600)]


def test_idle_vmm_has_no_huge_pages_and_a_capped_translation_cache(ember_env, image):
    sid = ember_env.run("run", "-d", image, "sleep", "300", check=True).stdout.decode().strip()
    info = json.loads(ember_env.run("inspect", sid, check=True).stdout)[0]
    pid = info["vmm_pid"]
    tb_mib = ember_env.cfg().vm.tcg_tb_size_mib
    assert info["jail"], "the VMM runs jailed"
    assert status(pid)["THP_enabled"] == "0"
    with open(f"/proc/{pid}/smaps_rollup") as f:
        huge = [int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")]
    assert huge == [0]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert f"tcg,tb-size={tb_mib}".encode() in argv
    # The largest executable anonymous mapping is the translation cache.
    sizes = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 2 and head[1] == "rwxp" and len(head) == 5:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                sizes.append(hi - lo)
    assert sizes and max(sizes) <= (tb_mib << 20) + (1 << 20)
    proc = ember_env.run("exec", sid, "cat", "/proc/cmdline", check=True)
    guest_cmdline = proc.stdout.decode().split()
    assert "init_on_free=1" in guest_cmdline
    # Nothing in an idle guest wakes it on a timer we can turn off: no
    # proactive compaction, no soft-lockup watchdog.
    knobs = ember_env.run("exec", sid, "cat", "/proc/sys/vm/compaction_proactiveness",
                          "/proc/sys/kernel/watchdog", check=True).stdout.decode().split()
    assert knobs == ["0", "0"], knobs
    # A guest told its TSC rate gets no PIT, so nothing ticks it while idle.
    machine = argv[argv.index(b"-M") + 1].decode()
    told = any(w.startswith("tsc_early_khz=") for w in guest_cmdline)
    assert machine.endswith(",pit=off") == told, (machine, guest_cmdline)
    irqs = ember_env.run("exec", sid, "cat", "/proc/interrupts", check=True).stdout.decode()
    assert any(line.split()[:1] == ["0:"] for line in irqs.splitlines()) != told, irqs
    ember_env.run("rm", "-f", sid, check=True)


def _anonymous_memory(pid: int) -> bytes:
    """The contents of every private anonymous mapping of pid."""
    spans = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            head = line.split()
            if len(head) == 5 and head[1].startswith("rw"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                spans.append((lo, hi))
    chunks = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for lo, hi in spans:
            try:
                mem.seek(lo)
                chunks.append(mem.read(hi - lo))
            except OSError:
                continue
    return b"".join(chunks)


def test_a_restored_vmm_holds_no_copy_of_the_kernel(ember_env, image, guest_assets):
    """QEMU keeps -kernel and -initrd in its own memory for its whole life
    (~14 MiB of private memory per sandbox); a restored guest does not need
    them, so a restore is given none."""
    sid = ember_env.run("run", "-d", image, "sleep", "300", check=True).stdout.decode().strip()
    try:
        info = json.loads(ember_env.run("inspect", sid, check=True).stdout)[0]
        assert info["restored_from_snapshot"]
        pid = info["vmm_pid"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert not {b"-kernel", b"-initrd", b"-append"} & set(argv), argv
        jail = info["jail"]
        root = (Path(jail["chroot_base_dir"]) / Path(jail["exec_file"]).name / jail["id"]
                / "root")
        assert root.is_dir(), root
        assert not (root / "vmlinuz").exists() and not (root / "initrd.img").exists()
        kernel = guest_assets.kernel.read_bytes()
        piece = kernel[len(kernel) // 2:len(kernel) // 2 + 4096]
        assert piece not in _anonymous_memory(pid)
        # It still knows its command line (the PIT rule reads it) and runs.
        out = ember_env.run("exec", sid, "cat", "/proc/cmdline", check=True).stdout.decode()
        assert "init_on_free=1" in out.split()
    finally:
        ember_env.run("rm", "-f", sid)


def _mapping_of(pid: int, inode: int) -> dict[str, object]:
    """The smaps entry of pid's mapping of the file with this inode."""
    entry: dict[str, object] = {}
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                if entry:
                    return entry
                if int(head[4]) == inode:
                    entry = {"perms": head[1]}
            elif entry and line.endswith(" kB\n"):
                entry[head[0].rstrip(":")] = int(head[1])
    return entry


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_restored_sandboxes_share_the_template_memory_and_cannot_change_it(ember_env, image):
    cfg = ember_env.cfg()
    if not can_share_ram(cfg.vm.qemu_binary):
        pytest.skip(f"{cfg.vm.qemu_binary} cannot map a read-only file as private RAM (QEMU < 8.2)")
    sids = [ember_env.run("run", "-d", image, "sleep", "300", check=True).stdout.decode().strip()
            for _ in range(2)]
    try:
        pids = [json.loads(ember_env.run("inspect", sid, check=True).stdout)[0]["vmm_pid"]
                for sid in sids]
        rams = {os.stat(p).st_ino: p for p in cfg.templates_dir.glob("*/vm.state.ram")}
        maps = {}
        for pid in pids:
            found = {ino: _mapping_of(pid, ino) for ino in rams}
            [(ino, entry)] = [(i, e) for i, e in found.items() if e]
            maps[pid] = entry
        ram = rams[ino]
        before = _sha256(ram)
        st = ram.stat()
        assert st.st_uid == 0 and st.st_mode & 0o777 == 0o444
        assert st.st_blocks * 512 < st.st_size // 2  # zero pages are holes on disk
        for pid, entry in maps.items():
            assert entry["perms"] == "rw-p", entry  # private: writes never reach the file
            # Most of what the guest touched is still the template's page-cache pages.
            assert entry["Shared_Clean"] >= 16 * 1024, entry
            assert entry["Pss"] < entry["Rss"] * 0.75, entry
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.stat(f"/proc/{pid}/fd/{fd}").st_ino == ino:
                        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                            flags = int(f.read().split("flags:")[1].split()[0], 8)
                        assert flags & os.O_ACCMODE == os.O_RDONLY, fds
                except FileNotFoundError:
                    continue
        # A guest that writes lots of memory changes its own copy only.
        ember_env.run("exec", sids[0], "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=2",
                      check=True)
        assert _sha256(ram) == before and ram.stat().st_mtime_ns == st.st_mtime_ns
        out = ember_env.run("exec", sids[1], "echo", "still-fine", check=True).stdout.decode()
        assert out.strip() == "still-fine"
    finally:
        for sid in sids:
            ember_env.run("rm", "-f", sid)
