"""Make a small demo image from Debian's busybox-static: ``python -m ember.image.demo NAME``.

The machine cannot pull from public registries, so setup.sh builds
``ember-demo:latest`` locally; tests reuse :func:`build_busybox_rootfs` for the
same reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ember.config import load_config
from ember.errors import EmberError, ImageError
from ember.image.store import Image, ImageStore

BUSYBOX = "/bin/busybox"
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def build_busybox_rootfs(dest: Path, busybox: str = BUSYBOX) -> Path:
    """Lay out a minimal root filesystem around a static busybox in ``dest``."""
    if not os.path.exists(busybox):
        raise ImageError(f"{busybox} not found (apt install busybox-static)")
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "root",
        "proc",
        "sys",
        "dev",
        "run",
        "var",
    ):
        (dest / d).mkdir(parents=True, exist_ok=True)
    tmp = dest / "tmp"
    tmp.mkdir(exist_ok=True)
    os.chmod(tmp, 0o1777)
    os.chmod(dest / "root", 0o700)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    out = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True)
    for applet in out.stdout.split():
        link = dest / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)
    (dest / "etc" / "passwd").write_text(PASSWD)
    (dest / "etc" / "group").write_text(GROUP)
    return dest


def make_demo_image(store: ImageStore, name: str) -> Image:
    with tempfile.TemporaryDirectory(prefix="ember-demo-") as tmp:
        root = build_busybox_rootfs(Path(tmp) / "rootfs")
        return store.import_rootfs(root, name, cmd=["sh"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ember.image.demo NAME[:TAG]", file=sys.stderr)
        return 2
    try:
        image = make_demo_image(ImageStore(load_config()), args[0])
    except EmberError as exc:
        print(f"ember: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(image.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
