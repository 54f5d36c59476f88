"""``ember check``: can this host run Ember's micro-VMs, and with what?

It reports what it finds, not what it hopes: a /dev/kvm node is only called
usable when it opens, answers KVM_GET_API_VERSION and lets us create a VM,
and even then the accelerator probe (ember.vmm.qemu.accel) may have found KVM too
slow to boot a guest, as on nested hosts: its recorded boot times are shown,
with when they were measured. A binary counts as Firecracker only when its
``--version`` says it is a Firecracker release and nothing else. The exit
status is 0 when the configured hypervisor can run VMs and guest assets are
built, 1 otherwise; ``--json`` prints one document with the same findings
(numbers as numbers, null for what is unknown).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field

import click

from ember.config import Config, load_config
from ember.errors import EmberError

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
PROBE_FILE = "accel-probe.json"  # written by ember.vmm.qemu.accel.resolve_accel
FIRECRACKER_RELEASE = re.compile(r"Firecracker v\d+\.\d+\.\d+(?:-[0-9A-Za-z.]+)?")


@dataclass
class Check:
    name: str
    status: str  # "ok" | "missing" | "warn" | "error"
    detail: str
    values: dict = field(default_factory=dict)  # stable keys per check; None = unknown


@dataclass
class Binary:
    path: str | None  # None: absent or does not run
    line: str  # first line of its version output, or why there is none
    version: str | None  # the version number in that line, when there is one


def probe_binary(binary: str, arg: str = "--version") -> Binary:
    """Run ``binary --version``: where it is, what it says, the version number."""
    path = shutil.which(binary) if os.sep not in binary else (binary if os.path.exists(binary)
                                                              else None)
    if path is None:
        return Binary(None, f"{binary} not found", None)
    try:
        out = subprocess.run([path, arg], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Binary(None, f"{path} does not run: {exc}", None)
    text = (out.stdout or out.stderr).strip().splitlines()
    if out.returncode != 0:
        return Binary(None, f"{path} {arg} failed: {text[-1] if text else out.returncode}", None)
    if not text:
        return Binary(path, "(no version output)", None)
    number = re.search(r"\bv?(\d+(?:\.\d+)+(?:-[0-9A-Za-z.]+)?)", text[0])
    return Binary(path, text[0], number.group(1) if number else None)


def seconds(value: float) -> str:
    """A duration for people: "3.3 s", "45 ms"."""
    return f"{value:.1f} s" if value >= 0.1 else f"{value * 1000:.0f} ms"


def check_kvm(device: str = "/dev/kvm") -> Check:
    """Open /dev/kvm and create (and drop) one VM: presence alone proves nothing."""
    values: dict = {"device": device, "api_version": None}
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return Check("kvm", "missing", f"{device} does not exist", values)
    except OSError as exc:
        return Check("kvm", "error", f"{device} cannot be opened: {exc.strerror}", values)
    try:
        api = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as exc:
        return Check("kvm", "error", f"{device} opens but does not work: {exc.strerror}",
                     values)
    finally:
        os.close(fd)
    values["api_version"] = api
    return Check("kvm", "ok", f"{device} works (API version {api}, can create a VM)", values)


def read_probe(cfg: Config) -> dict:
    """The accelerator probe's last record: boot times rounded, null when not measured."""
    path = cfg.data_dir / PROBE_FILE
    out: dict = {"recorded": False, "kvm_boot_s": None, "tcg_boot_s": None, "chosen": None,
                 "measured_at": None}
    try:
        record = json.loads(path.read_text())
        measured = path.stat().st_mtime
    except (OSError, ValueError):
        return out
    if not isinstance(record, dict):
        return out
    out["recorded"] = True
    for accel in ("kvm", "tcg"):
        value = record.get(f"{accel}_s")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{accel}_boot_s"] = round(float(value), 2)
    if record.get("accel") in ("kvm", "tcg"):
        out["chosen"] = record["accel"]
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(measured))
    return out


def chosen_accel(cfg: Config, kvm_ok: bool, probe: dict) -> str | None:
    """What QEMU runs with: as set, TCG without KVM, else the probe's verdict (None
    until the probe has run)."""
    if cfg.vm.accel in ("kvm", "tcg"):
        return cfg.vm.accel
    return probe["chosen"] if kvm_ok else "tcg"


def check_accel_probe(cfg: Config, kvm: Check) -> Check:
    """The boot probe's times, with units: KVM may work and still crawl."""
    probe = read_probe(cfg)
    values = {"configured": cfg.vm.accel, "chosen": chosen_accel(cfg, kvm.status == "ok", probe),
              **{k: probe[k] for k in ("recorded", "kvm_boot_s", "tcg_boot_s", "measured_at")}}
    name = "accel probe"
    if cfg.vm.accel == "kvm" and kvm.status != "ok":
        return Check(name, "error", 'not run: vm.accel = "kvm" is set but KVM is not usable',
                     values)
    if cfg.vm.accel in ("kvm", "tcg"):
        return Check(name, "ok", f'not run: vm.accel = "{cfg.vm.accel}" is used as set', values)
    if kvm.status != "ok":
        return Check(name, "ok", "not needed: KVM is not usable, QEMU uses TCG", values)
    if not probe["recorded"] or probe["chosen"] is None:
        return Check(name, "warn", "not measured yet (the first VM start boots the guest "
                     "kernel under KVM and TCG once and keeps the faster)", values)

    def boot(accel: str) -> str:
        took = probe[f"{accel}_boot_s"]
        return f"{accel}: boots in {seconds(took)}" if took is not None else \
            f"{accel}: does not boot (no boot within the probe's time limit, or QEMU failed)"

    when = probe["measured_at"].replace("T", " ").rstrip("Z") + " UTC"
    detail = f"{boot('kvm')}; {boot('tcg')}; QEMU uses {probe['chosen'].upper()} " \
             f"(measured {when})"
    if probe["chosen"] == "kvm":
        return Check(name, "ok", detail, values)
    return Check(name, "warn", f"{detail}; Firecracker needs a KVM that boots", values)


def _binary_check(name: str, found: Binary, hint: str = "") -> Check:
    values = {"path": found.path, "version": found.version}
    if found.path is None:
        return Check(name, "missing", found.line + hint, values)
    return Check(name, "ok", f"{found.path}: {found.line}", values)


def check_firecracker(cfg: Config, kvm: Check) -> Check:
    found = probe_binary(cfg.vm.firecracker_binary)
    check = _binary_check("firecracker", found,
                          " (set vm.firecracker_binary or EMBER_FIRECRACKER_BIN)")
    if found.path is None:
        return check
    if not FIRECRACKER_RELEASE.fullmatch(found.line):
        check.values["version"] = None
        return Check("firecracker", "warn", f"{found.path} does not say it is a Firecracker "
                     f"release (its --version says {found.line!r}): not used", check.values)
    if kvm.status != "ok":
        return Check("firecracker", "warn", f"{check.detail}, but it needs a usable KVM",
                     check.values)
    return check


def guest_state(cfg: Config) -> dict:
    """Built? Which key and kernel? Up to date with this host's ember code?"""
    from ember.guest.build import guest_info

    out: dict = {"built": False, "up_to_date": None, "key": None, "kernel_release": None}
    try:
        info = guest_info(cfg)
    except (EmberError, OSError):
        return out
    out["built"] = bool(info.get("built"))
    for key in ("up_to_date", "key", "kernel_release"):
        if info.get(key) is not None:
            out[key] = info[key]
    return out


def check_guest(cfg: Config) -> Check:
    from ember.guest.build import current_assets

    values = guest_state(cfg)
    try:
        assets = current_assets(cfg)
    except EmberError as exc:
        return Check("guest assets", "missing", exc.message, values)
    return Check("guest assets", "ok", f"kernel {assets.kernel_release} in "
                 f"{assets.kernel.parent}", values)


def run_checks(cfg: Config) -> list[Check]:
    checks = [_binary_check("qemu", probe_binary(cfg.vm.qemu_binary))]
    kvm = check_kvm()
    checks.append(kvm)
    checks.append(check_accel_probe(cfg, kvm))
    checks.append(check_firecracker(cfg, kvm))
    checks.append(_binary_check("crun", probe_binary("crun")))
    checks.append(check_guest(cfg))
    return checks


def verdict(cfg: Config, checks: list[Check]) -> tuple[bool, str]:
    by_name = {c.name: c for c in checks}
    from ember.vmm import configured

    hv = cfg.vm.hypervisor
    ready = configured(cfg).host_ready(lambda name: by_name[name].status)
    ready = ready and by_name["guest assets"].status == "ok"
    return ready, (f"hypervisor {hv!r}: {'ready' if ready else 'NOT ready'}"
                   + ("" if by_name["guest assets"].status == "ok"
                      else " (guest assets missing: run `ember guest build`)"))


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON document.")
def check_cmd(as_json: bool) -> None:
    """Report which hypervisors, KVM, crun and guest assets this host has."""
    try:
        cfg = load_config()
    except EmberError as exc:
        click.echo(f"ember: error: {exc.message}", err=True)
        raise SystemExit(exc.exit_code) from None
    checks = run_checks(cfg)
    ready, summary = verdict(cfg, checks)
    if as_json:
        accel = next(c for c in checks if c.name == "accel probe").values
        click.echo(json.dumps({"ready": ready, "hypervisor": cfg.vm.hypervisor,
                               "accel": {"configured": accel["configured"],
                                         "chosen": accel["chosen"]},
                               "summary": summary,
                               "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            click.echo(f"{c.status.upper():8} {c.name:15} {c.detail}")
        click.echo(summary)
    raise SystemExit(0 if ready else 1)
