"""Build, cache and locate the guest assets every micro-VM boots.

Layout under ``cfg.guest_dir``::

    <key>/vmlinuz  initrd.img  rootfs.ext4  manifest.json   one finished build
    debs/*.deb                                              downloaded packages
    resolve.json                                            apt resolution cache
    current                                                 {"key": ...} of the build in use
    .build-<key>-*/                                         a build in progress

``key`` hashes every input (package versions, the agent's source, the
protobuf version, this builder's own source), so a build is redone exactly
when something that ends up in the guest changed. Builds happen in a temp
folder renamed into place, under a lock: readers see a whole build or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ember.config import Config
from ember.errors import GuestError
from ember.guest import debs, initrd, kernel, modules, rootfs
from ember.util import atomic_write_json, file_lock

BUILDER_VERSION = 1

# Debian packages unpacked into the rootfs, with their library dependencies.
ROOTFS_PACKAGES = [
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "crun",
    "busybox-static",
    "libstdc++6",  # protobuf's C extension (google._upb) links it
    "kmod",  # modprobe, which the kernel runs to load a module on demand
    "tini",  # /usr/bin/tini-static: `ember run --init` bind-mounts it as the container's PID 1
]

# The kernel command line; microvm adds its virtio_mmio.device= entries itself.
# reboot=t + panic=-1: a dying guest resets at once, which `-no-reboot` turns
# into QEMU exiting. tsc=reliable / no_timer_check: under TCG on a busy host
# the timer sanity checks misfire and cost seconds. Measured under TCG, each
# about 1s of guest CPU per boot: the CMOS RTC driver spins on a clock the VM
# does not have (rtc=off; the agent sets the time), and the crypto self-tests.
# An idle guest should not wake itself: under TCG every wake-up of an idle VM
# is host CPU, paid per sandbox (issue 14). So no proactive compaction
# (kcompactd woke twice a second to measure fragmentation; compaction on
# demand stays) and no soft-lockup watchdog (its timer fires every 4 s, and a
# vCPU stalled by the host's scheduler is not a guest bug to report).
# init_on_free: a page the guest frees is zeroed, so the template snapshot
# carries it as a zero page and a restore never makes it resident (issue 14).
# [guest] extra_cmdline comes last: it may end the kernel's arguments with `--`.
BASE_CMDLINE = (
    "console=ttyS0 reboot=t panic=-1 root=/dev/vda ro quiet tsc=reliable no_timer_check"
    " initcall_blacklist=cmos_init cryptomgr.notests"
    " sysctl.vm.compaction_proactiveness=0 nowatchdog init_on_free=1"
)

# Uncompressed (3.8 MB; 1.5 MB gzipped). Measured under TCG, booting to /init
# cost the same QEMU CPU time either way (5.3 s vs 5.3 s, three runs each):
# the guest's gunzip and QEMU copying 2 MB more cancel out, so the simpler wins.
COMPRESS_INITRD = False

NOT_BUILT = "guest assets not built: run `ember guest build`"


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_release: str
    key: str
    cmdline: str


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host's TSC rate in kHz, read from its calibrated BogoMIPS.

    Under TCG the guest's TSC is the host's. The guest calibrates it against
    the PIT, which fails when the host is busy ("tsc: Unable to calibrate
    against PIT"), and the kernel then hangs early in boot. Telling it the rate
    (``tsc_early_khz=``) skips that calibration. x86 kernels with an invariant
    TSC derive BogoMIPS from it: BogoMIPS = 2 * TSC MHz.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags: set[str] = set()
    bogomips = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "bogomips" and bogomips is None:
            try:
                bogomips = float(value)
            except ValueError:
                return None
    if bogomips is None or not {"tsc", "constant_tsc"} <= flags:
        return None
    return round(bogomips * 500)


def kernel_cmdline(cfg: Config) -> str:
    khz = host_tsc_khz()
    tsc = f" tsc_early_khz={khz}" if khz else ""
    return f"{BASE_CMDLINE}{tsc} {cfg.guest.extra_cmdline}".strip()


# ---------------------------------------------------------------- key inputs


def _hash_tree(h: hashlib._Hash, root: Path, names: tuple[str, ...]) -> None:
    for name in names:
        top = root / name
        files = [top] if top.is_file() else sorted(top.rglob("*"))
        for f in files:
            if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".pyc", ".pyi"):
                h.update(f"{f.relative_to(root)}\0".encode())
                h.update(f.read_bytes())


def local_digest() -> str:
    """Hash of what this host contributes besides packages: our code, protobuf."""
    import google.protobuf

    h = hashlib.sha256(
        f"builder {BUILDER_VERSION} protobuf {google.protobuf.__version__}\n".encode()
    )
    _hash_tree(h, rootfs.PACKAGE_DIR, rootfs.EMBER_FILES)
    guest_src = resources.files("ember.guest")
    for name in sorted(p.name for p in guest_src.iterdir() if p.name.endswith((".py", ".sh"))):
        h.update(name.encode() + b"\0" + guest_src.joinpath(name).read_bytes())
    return h.hexdigest()


def build_key(local: str, packages: dict[str, debs.Package]) -> str:
    h = hashlib.sha256(local.encode())
    for name in sorted(packages):
        p = packages[name]
        h.update(f"{name} {p.version} {p.sha256}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ overrides


def _overrides(cfg: Config) -> dict[str, Path]:
    """User-supplied kernel/initrd/rootfs, checked to exist."""
    found = {}
    for what in ("kernel", "initrd", "rootfs"):
        value = getattr(cfg.guest, what)
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise GuestError(f"config guest.{what}: {path} does not exist or is not a file")
            found[what] = path.resolve()
    return found


def _apply_overrides(cfg: Config, assets: GuestAssets | None) -> GuestAssets:
    user = _overrides(cfg)
    if assets is None:
        if len(user) < 3:
            raise GuestError(NOT_BUILT)
        digest = hashlib.sha256("\0".join(str(user[w]) for w in sorted(user)).encode())
        assets = GuestAssets(
            user["kernel"],
            user["initrd"],
            user["rootfs"],
            kernel.bzimage_release(user["kernel"]),
            "user-" + digest.hexdigest()[:10],
            kernel_cmdline(cfg),
        )
    release = kernel.bzimage_release(user["kernel"]) if "kernel" in user else assets.kernel_release
    return GuestAssets(
        user.get("kernel", assets.kernel),
        user.get("initrd", assets.initrd),
        user.get("rootfs", assets.rootfs),
        release,
        assets.key,
        kernel_cmdline(cfg),
    )


# ---------------------------------------------------------------------- cache


def _read_manifest(cfg: Config, key: str) -> dict | None:
    try:
        return json.loads((cfg.guest_dir / key / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _assets_from(cfg: Config, key: str, manifest: dict) -> GuestAssets:
    d = cfg.guest_dir / key
    return GuestAssets(
        d / "vmlinuz",
        d / "initrd.img",
        d / "rootfs.ext4",
        manifest["kernel_release"],
        key,
        kernel_cmdline(cfg),
    )


def _current_key(cfg: Config) -> str | None:
    try:
        return json.loads((cfg.guest_dir / "current").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def current_assets(cfg: Config) -> GuestAssets:
    """The assets a VM should boot now, without building anything.

    Raises GuestError when nothing is built, or when the build in place no
    longer matches this host's ember code (the guest would run a stale agent).
    """
    if len(_overrides(cfg)) == 3:
        return _apply_overrides(cfg, None)
    key = _current_key(cfg)
    manifest = _read_manifest(cfg, key) if key else None
    if not key or not manifest or not all(
        (cfg.guest_dir / key / f).is_file() for f in ("vmlinuz", "initrd.img", "rootfs.ext4")
    ):
        raise GuestError(NOT_BUILT)
    if manifest.get("local_digest") != local_digest():
        raise GuestError(
            "guest assets are out of date (ember's agent code changed): run `ember guest build`"
        )
    return _apply_overrides(cfg, _assets_from(cfg, key, manifest))


@contextlib.contextmanager
def _locked(cfg: Config) -> Iterator[None]:
    """One builder at a time per data dir; a second one waits, then finds it done."""
    with file_lock(cfg.guest_dir / ".lock"):
        yield


def _collect_garbage(cfg: Config, keep: str, debs_in_use: set[str]) -> None:
    """Remove other builds, abandoned temp folders and unused .debs."""
    for entry in cfg.guest_dir.iterdir():
        if entry.name in (keep, "debs") or not entry.is_dir():
            continue
        if (
            entry.name.startswith(".build-")
            or (cfg.guest_dir / entry.name / "manifest.json").exists()
            or entry.name.startswith(".old-")
        ):
            shutil.rmtree(entry, ignore_errors=True)
    debs.prune_cache(cfg.guest_dir / "debs", debs_in_use)


# ---------------------------------------------------------------------- build


class _Steps:
    """A rich progress bar over the build steps (or nothing when quiet)."""

    STEPS = ("download", "kernel", "initrd", "rootfs", "done")

    def __init__(self, enabled: bool) -> None:
        self._progress = None
        if enabled:
            # Here, not at the top: sandbox monitors import this module to find
            # the guest assets, and rich would add ~3 MiB to each of them.
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("guest build: {task.description:<9}"),
                BarColumn(),
                TimeElapsedColumn(),
                transient=False,
            )

    def __enter__(self) -> _Steps:
        if self._progress:
            self._progress.start()
            self._task = self._progress.add_task(self.STEPS[0], total=len(self.STEPS))
        return self

    def step(self, name: str) -> None:
        if self._progress:
            self._progress.update(self._task, description=name, completed=self.STEPS.index(name))

    def __exit__(self, *exc: object) -> None:
        if self._progress:
            if exc[0] is None:
                self._progress.update(self._task, description="done", completed=len(self.STEPS))
            self._progress.stop()


def _build_into(
    out: Path,
    kernel_pkg: str,
    packages: dict[str, debs.Package],
    deb_paths: dict[str, Path],
    steps: _Steps,
) -> dict:
    work = out / "work"
    steps.step("kernel")
    debs.extract(deb_paths[kernel_pkg], work / "kernel")
    parts = kernel.prepare(work / "kernel", work / "kparts")
    os.replace(parts.vmlinuz, out / "vmlinuz")
    tree = work / "root"
    shipped = modules.install(work / "kernel", parts.release, tree / "usr")
    shutil.rmtree(work / "kernel")

    steps.step("initrd")
    debs.extract(deb_paths["busybox-static"], work / "busybox")
    initrd.build_initrd(
        out / "initrd.img",
        work / "busybox/bin/busybox",
        parts.modules,
        parts.groups,
        rootfs.PYTHONPATH,
        compress=COMPRESS_INITRD,
    )

    steps.step("rootfs")
    for name in sorted(packages):
        if name != kernel_pkg:
            debs.extract(deb_paths[name], tree)
    rootfs.finish_tree(tree)
    rootfs.make_image(tree, out / "rootfs.ext4")
    shutil.rmtree(work)
    return {
        "kernel_release": parts.release,
        "modules": parts.groups,
        "rootfs_modules": {"shipped": shipped.modules, "left_out": shipped.dropped},
    }


def build_guest(cfg: Config, progress: bool = True, force: bool = False) -> GuestAssets:
    """Build the guest assets unless a build for the same inputs exists.

    Returns what :func:`current_assets` will return from now on. User
    overrides (``guest.kernel`` / ``initrd`` / ``rootfs``) replace built
    files; with all three set nothing is built at all.
    """
    if len(_overrides(cfg)) == 3:
        return _apply_overrides(cfg, None)
    with _locked(cfg):
        try:
            return _build_locked(cfg, progress, force)
        except debs.ListsRefreshed:
            # Versions moved on the mirror; the new lists give a new resolution.
            return _build_locked(cfg, progress, force)


def _build_locked(cfg: Config, progress: bool, force: bool) -> GuestAssets:
    kernel_pkg, packages = debs.resolve(
        ROOTFS_PACKAGES, cfg.guest.kernel_package, cfg.guest_dir / "resolve.json"
    )
    local = local_digest()
    key = build_key(local, packages)
    manifest = _read_manifest(cfg, key)
    if manifest is None or force:
        manifest = _build_new(cfg, key, local, kernel_pkg, packages, progress)
    atomic_write_json(cfg.guest_dir / "current", {"key": key})
    _collect_garbage(cfg, key, {p.deb_name for p in packages.values()})
    return _apply_overrides(cfg, _assets_from(cfg, key, manifest))


def _build_new(
    cfg: Config,
    key: str,
    local: str,
    kernel_pkg: str,
    packages: dict[str, debs.Package],
    progress: bool,
) -> dict:
    """Build into a temp folder, then rename it to ``<key>`` in one step."""
    started = time.time()
    final = cfg.guest_dir / key
    with _Steps(progress) as steps:
        deb_paths = debs.download(list(packages.values()), cfg.guest_dir / "debs")
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cfg.guest_dir))
        try:
            os.chmod(tmp, 0o755)
            built = _build_into(tmp, kernel_pkg, packages, deb_paths, steps)
            manifest = {
                "key": key,
                "local_digest": local,
                "builder_version": BUILDER_VERSION,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.time() - started, 1),
                "kernel_package": kernel_pkg,
                "packages": {n: p.version for n, p in sorted(packages.items())},
                "initrd_compressed": COMPRESS_INITRD,
                **built,
            }
            atomic_write_json(tmp / "manifest.json", manifest)
            if final.exists():  # --force: move the old build aside, GC removes it
                os.replace(final, cfg.guest_dir / f".old-{key}-{os.getpid()}")
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def guest_info(cfg: Config) -> dict:
    """What is built and in use: for ``ember guest info`` and bug reports."""
    info: dict = {"guest_dir": str(cfg.guest_dir), "cmdline": kernel_cmdline(cfg)}
    try:
        user = _overrides(cfg)
    except GuestError as exc:
        user, info["error"] = {}, exc.message
    info["overrides"] = {w: str(p) for w, p in user.items()}
    key = _current_key(cfg)
    manifest = _read_manifest(cfg, key) if key else None
    info["built"] = manifest is not None
    if manifest:
        info.update(
            key=key,
            kernel_release=manifest["kernel_release"],
            built_at=manifest["built_at"],
            kernel_package=manifest.get("kernel_package"),
            packages=manifest["packages"],
            up_to_date=manifest.get("local_digest") == local_digest(),
        )
    files = {}
    for what, name in (("kernel", "vmlinuz"), ("initrd", "initrd.img"), ("rootfs", "rootfs.ext4")):
        path = user.get(what) or (cfg.guest_dir / key / name if key and manifest else None)
        if path is not None:
            st = path.stat() if path.exists() else None
            files[what] = {
                "path": str(path),
                "size": st.st_size if st else None,
                "disk_usage": st.st_blocks * 512 if st else None,
                "user_override": what in user,
            }
    info["files"] = files
    if "kernel" in user:
        info["kernel_release"] = kernel.bzimage_release(user["kernel"])
    return info
