"""A test image for proving ``ember-snapshotter --backend lvm`` on a real kernel.

This host's kernel has no device-mapper; the guest kernel Ember boots has
dm-thin-pool. So the LVM backend is tested inside an Ember VM, from an image
holding lvm2, thin-provisioning-tools, e2fsprogs, util-linux, Python with the
snapshotter's libraries (grpc, protobuf, click, pytest: the host's, so the
generated code matches), the project's ``ember`` package and tests, and
containerd's snapshotter conformance binary. Built like the guest rootfs
(``apt-get download`` + ``dpkg-deb -x``, no chroot), imported with
``ImageStore.import_rootfs``, and cached under the name
``ember-lvm-test:<key>``, where the key hashes every input: package versions,
the ember source, the tests and the conformance binary.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import ember
from ember.config import Config
from ember.errors import ImageError
from ember.guest import debs, rootfs
from ember.image.store import ImageStore

BUILDER_VERSION = 1
PACKAGES = [
    "lvm2", "thin-provisioning-tools", "e2fsprogs", "mount", "util-linux",
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libstdc++6",
    "busybox-static",
]
# Import roots copied from the host's site-packages (with their dist-info).
SITE = ("grpc", "google/protobuf", "google/_upb", "click", "pytest", "_pytest", "pluggy",
        "iniconfig", "packaging", "pytest_timeout.py", "pygments", "typing_extensions.py", "py.py")
SNAPTEST = Path("/work/shared/conformance/snapshotter/snaptest.test")
DISTS = ("grpcio", "protobuf", "click", "pytest", "pluggy", "iniconfig", "packaging", "pygments",
         "typing_extensions",
         "pytest_timeout")
TESTS_DIR = Path(__file__).resolve().parents[3] / "tests"
TEST_FILES = ("test_snapshotter_lvm.py",)
GUEST_DIR = "/opt/ember-test"

# udev does not run in a container: LVM and libdevmapper make the /dev nodes
# themselves, and nothing waits for udev or dmeventd.
LVM_CONF = """\
devices {
    obtain_device_list_from_udev = 0
    use_devicesfile = 0
}
activation {
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
}
"""

SNAPSHOTTER = """\
#!/bin/sh
exec /usr/bin/python3.11 -m ember.snapshotter.main "$@"
"""


def _inputs_digest(packages: dict[str, debs.Package], snaptest: Path) -> str:
    h = hashlib.sha256(f"lvm test image {BUILDER_VERSION}\n".encode())
    for name in sorted(packages):
        h.update(f"{name} {packages[name].version}\n".encode())
    src = Path(ember.__file__).parent
    for f in sorted(src.rglob("*.py")):
        if "__pycache__" not in f.parts:
            h.update(f"{f.relative_to(src)}\0".encode() + f.read_bytes())
    for name in TEST_FILES:
        h.update(name.encode() + (TESTS_DIR / name).read_bytes())
    st = snaptest.stat()
    h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
    for rel in SITE:
        h.update(rel.encode())
    h.update(LVM_CONF.encode() + SNAPSHOTTER.encode())
    return h.hexdigest()[:16]


def ensure_image(cfg: Config, snaptest: Path = SNAPTEST) -> str:
    """The image's name, building and importing it first if its inputs changed."""
    cache = cfg.data_dir / "test-images"
    cache.mkdir(parents=True, exist_ok=True)
    _kernel, packages = debs.resolve(PACKAGES, cfg.guest.kernel_package,
                                     cache / "lvm-resolve.json")
    packages = {n: p for n, p in packages.items() if not n.startswith("linux-image-")}
    name = f"ember-lvm-test:{_inputs_digest(packages, snaptest)}"
    store = ImageStore(cfg)
    try:
        store.resolve(name)
        return name
    except ImageError:
        pass
    deb_paths = debs.download(list(packages.values()), cache / "debs")
    with tempfile.TemporaryDirectory(prefix="lvm-image-", dir=cache) as tmp:
        tree = Path(tmp) / "root"
        for pkg in sorted(packages):
            debs.extract(deb_paths[pkg], tree)
        rootfs.finish_tree(tree)
        _add_project(tree, snaptest)
        store.import_rootfs(tree, name, cmd=["sh"],
                            env=[f"PYTHONPATH={rootfs.PYTHONPATH}",
                                 "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"])
    return name


def _add_project(tree: Path, snaptest: Path) -> None:
    """The whole ember package, the Python libraries, the tests and the suite."""
    lib = tree / rootfs.PYTHONPATH.lstrip("/")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.rmtree(lib / "ember", ignore_errors=True)
    shutil.copytree(Path(ember.__file__).parent, lib / "ember", ignore=ignore)
    site = rootfs.site_packages_dir()
    for rel in SITE:
        src, dest = site / rel, lib / rel
        if dest.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, dest, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest)
        else:
            raise ImageError(f"lvm test image: {src} is not installed on this host")
    for dist in DISTS:  # entry points: pytest finds the pytest-timeout plugin by its metadata
        for info in site.glob(f"{dist}-*.dist-info"):
            if not (lib / info.name).exists():
                shutil.copytree(info, lib / info.name)
    tests = tree / GUEST_DIR.lstrip("/")
    tests.mkdir(parents=True, exist_ok=True)
    for name in TEST_FILES:
        shutil.copy2(TESTS_DIR / name, tests / name)
    _copy_exec(snaptest, tree / "usr/local/bin")
    launcher = tree / "usr/local/bin/ember-snapshotter"
    launcher.write_text(SNAPSHOTTER)
    launcher.chmod(0o755)
    (tree / "etc/lvm").mkdir(parents=True, exist_ok=True)
    (tree / "etc/lvm/lvm.conf").write_text(LVM_CONF)
    for d in ("run/lock/lvm", "run/lvm", "etc/lvm/archive", "etc/lvm/backup"):
        (tree / d).mkdir(parents=True, exist_ok=True)


def _copy_exec(src: Path, dest_dir: Path) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest_dir / src.name)
    (dest_dir / src.name).chmod(0o755)
