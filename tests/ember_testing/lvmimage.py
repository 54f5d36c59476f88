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

BUILDER_VERSION = 2
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
TESTS_DIR = Path(__file__).resolve().parents[1]
# The test file and the test support it imports (pytest puts the guest's test
# folder on sys.path, so ember_testing is found beside it).
TEST_FILES = ("test_snapshotter_lvm.py", "ember_testing/__init__.py", "ember_testing/mounts.py",
              "ember_testing/snapshotter.py")
GUEST_DIR = "/opt/ember-test"
REPO = "ember-lvm-test"

# udev does not run in a container: LVM and libdevmapper make the /dev nodes
# themselves, and nothing waits for udev or dmeventd. Every lvm command under
# TCG costs what it reads and writes: only loop devices are scanned for PVs
# (the tests' pools are loop files; the VM's own disks are not looked at), and
# no metadata archive or backup copy is written on each change (the VG lives
# as long as the VM).
LVM_CONF = """\
devices {
    obtain_device_list_from_udev = 0
    use_devicesfile = 0
    global_filter = [ "a|^/dev/loop[0-9]+$|", "r|.*|" ]
}
activation {
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
    verify_udev_operations = 0
}
backup {
    backup = 0
    archive = 0
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
    name = f"{REPO}:{_inputs_digest(packages, snaptest)}"
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
        rootfs.compile_python(tree)  # the project and libraries too: no compiling in the guest
        store.import_rootfs(tree, name, cmd=["sh"],
                            env=[f"PYTHONPATH={rootfs.PYTHONPATH}",
                                 "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"])
    _drop_older(store, name)
    return name


def _drop_older(store: ImageStore, current: str) -> None:
    """Remove the test images of earlier inputs: every source change makes a new
    one (~130 MB), and the shared cache would keep them all."""
    ours = store.resolve(current).id
    for image in store.list():
        if image.id != ours and any(n.split("/")[-1].startswith(f"{REPO}:")
                                    for n in image.names):
            try:
                store.remove(image.id)
            except ImageError:
                pass  # another session removed it first


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
        (tests / name).parent.mkdir(parents=True, exist_ok=True)
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
