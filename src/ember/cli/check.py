"""``ember check``: can this host run Ember's micro-VMs, and with what?

It reports what it finds, not what it hopes: a /dev/kvm node is only called
usable when it opens, answers KVM_GET_API_VERSION and lets us create a VM,
and even then the accelerator probe (ember.vmm.accel) may have found KVM too
slow to boot a guest, as on nested hosts — that verdict is shown when there
is one. Firecracker is "present" only when its binary runs and says so; the
test fake says it is a fake and is reported as one. The exit status is 0 when
the configured hypervisor can run VMs and guest assets are built, 1 otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass

import click

from ember.config import Config, load_config
from ember.errors import EmberError

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01


@dataclass
class Check:
    name: str
    status: str  # "ok" | "missing" | "warn" | "error"
    detail: str


def _version(binary: str, arg: str = "--version") -> tuple[str | None, str]:
    """(resolved path, first output line) or (None, why not)."""
    path = shutil.which(binary) if os.sep not in binary else (binary if os.path.exists(binary)
                                                              else None)
    if path is None:
        return None, f"{binary} not found"
    try:
        out = subprocess.run([path, arg], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{path} does not run: {exc}"
    text = (out.stdout or out.stderr).strip().splitlines()
    if out.returncode != 0:
        return None, f"{path} {arg} failed: {text[-1] if text else out.returncode}"
    return path, text[0] if text else "(no version output)"


def check_kvm(device: str = "/dev/kvm") -> Check:
    """Open /dev/kvm and create (and drop) one VM: presence alone proves nothing."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return Check("kvm", "missing", f"{device} does not exist")
    except OSError as exc:
        return Check("kvm", "error", f"{device} cannot be opened: {exc.strerror}")
    try:
        api = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as exc:
        return Check("kvm", "error", f"{device} opens but does not work: {exc.strerror}")
    finally:
        os.close(fd)
    return Check("kvm", "ok", f"{device} works (API version {api}, can create a VM)")


def check_accel_probe(cfg: Config, kvm: Check) -> Check | None:
    """The boot probe's verdict, if one was recorded: KVM may work and still crawl."""
    if kvm.status != "ok":
        return None
    try:
        probe = json.loads((cfg.data_dir / "accel-probe.json").read_text())
    except (OSError, ValueError):
        return Check("kvm boot probe", "warn", "not run yet (it runs on the first VM start "
                     "with vm.accel = \"auto\")")
    if probe.get("accel") == "kvm":
        return Check("kvm boot probe", "ok", f"guest boots under KVM in {probe.get('kvm_s')}s "
                     f"(TCG: {probe.get('tcg_s')}s)")
    return Check("kvm boot probe", "warn", "KVM did not boot the guest kernel, or was slower "
                 f"than TCG (kvm: {probe.get('kvm_s')}s, tcg: {probe.get('tcg_s')}s): "
                 "QEMU uses TCG, Firecracker cannot run well here")


def check_firecracker(cfg: Config, kvm: Check) -> Check:
    path, detail = _version(cfg.vm.firecracker_binary)
    if path is None:
        return Check("firecracker", "missing",
                     f"{detail} (set vm.firecracker_binary or EMBER_FIRECRACKER_BIN)")
    if "ember test fake" in detail:
        return Check("firecracker", "warn", f"{path} is Ember's test fake, not a Firecracker: "
                     "it serves the API but runs no VM")
    if kvm.status != "ok":
        return Check("firecracker", "warn", f"{path}: {detail}, but it needs a usable KVM")
    return Check("firecracker", "ok", f"{path}: {detail}")


def check_guest(cfg: Config) -> Check:
    from ember.guest.build import current_assets

    try:
        assets = current_assets(cfg)
    except EmberError as exc:
        return Check("guest assets", "missing", exc.message)
    return Check("guest assets", "ok", f"kernel {assets.kernel_release} in "
                 f"{assets.kernel.parent}")


def run_checks(cfg: Config) -> list[Check]:
    qemu_path, qemu_detail = _version(cfg.vm.qemu_binary)
    checks = [Check("qemu", "ok" if qemu_path else "missing",
                    f"{qemu_path}: {qemu_detail}" if qemu_path else qemu_detail)]
    kvm = check_kvm()
    checks.append(kvm)
    probe = check_accel_probe(cfg, kvm)
    if probe is not None:
        checks.append(probe)
    checks.append(check_firecracker(cfg, kvm))
    crun_path, crun_detail = _version("crun")
    checks.append(Check("crun", "ok" if crun_path else "missing",
                        f"{crun_path}: {crun_detail}" if crun_path else crun_detail))
    checks.append(check_guest(cfg))
    return checks


def verdict(cfg: Config, checks: list[Check]) -> tuple[bool, str]:
    by_name = {c.name: c for c in checks}
    hv = cfg.vm.hypervisor
    if hv == "firecracker":
        fc = by_name["firecracker"]
        ready = fc.status == "ok" and by_name["kvm"].status == "ok"
    else:
        ready = by_name["qemu"].status == "ok"
    ready = ready and by_name["guest assets"].status == "ok"
    return ready, (f"hypervisor {hv!r}: {'ready' if ready else 'NOT ready'}"
                   + ("" if by_name["guest assets"].status == "ok"
                      else " (guest assets missing: run `ember guest build`)"))


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
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
        click.echo(json.dumps({"ready": ready, "hypervisor": cfg.vm.hypervisor,
                               "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            click.echo(f"{c.status.upper():8} {c.name:15} {c.detail}")
        click.echo(summary)
    raise SystemExit(0 if ready else 1)
