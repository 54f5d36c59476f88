"""Named volumes: sparse ext4 disk images that outlive sandboxes.

Ember shares no filesystem with its guests, so a volume is a block device:
``<data_dir>/volumes/<name>/volume.img``, a sparse ext4 image (made with
``mkfs.ext4``, no mount or loop device on the host) that a sandbox's VM gets
as one more hot-plugged disk, mounted at the target inside the container. A
10 GiB volume costs a few MiB until written.

Who uses a volume (ember.sandbox.volumes) is read from the sandbox records,
never from a flag on the volume: a sandbox holds its volumes while it is live (``creating``, ``running``,
``paused``; a sandbox whose monitor died is ``dead`` and holds nothing), so a
crash can never leave a volume locked. The check and the new sandbox's record
are made under the sandbox store's lock, so two ``ember run`` cannot both get
a volume read-write. Rules: one read-write user at a time, with no reader
beside it (ext4 is not a cluster filesystem: a second kernel reading it while
another writes sees torn metadata); any number of read-only users.

Every folder is made whole under a temporary name and renamed into place,
so a killed ``ember volume create`` leaves a volume or nothing (and a
``.new-*`` folder that the next listing removes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ember.config import Config
from ember.errors import EmberError, NotFoundError
from ember.util import atomic_write_json, parse_size, private_dir

IMAGE = "volume.img"
META = "volume.json"
DEFAULT_SIZE = 10 << 30
MIN_SIZE = 16 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STALE_S = 600  # a half-made folder older than this is a killed create's


@dataclass
class VolumeInfo:
    name: str
    size: int  # bytes the filesystem may grow to
    created: float
    path: Path  # the image
    used: int = 0  # bytes the image really occupies on the host

    def as_dict(self) -> dict:
        return {"name": self.name, "driver": "ember-block", "size": self.size,
                "used": self.used, "created": self.created, "image": str(self.path)}


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise EmberError(f"invalid volume name {name!r}: use 1-64 letters, digits, _ . - "
                         "(starting with a letter or digit)")
    return name


class VolumeStore:
    """The named volumes under ``<data_dir>/volumes``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = Path(cfg.data_dir) / "volumes"

    def dir(self, name: str) -> Path:
        return self.root / check_name(name)

    # ----------------------------------------------------------------- read
    def get(self, name: str) -> VolumeInfo:
        folder = self.dir(name)
        try:
            meta = json.loads((folder / META).read_text())
            st = os.stat(folder / IMAGE)
        except FileNotFoundError:
            raise NotFoundError(f"no such volume: {name}") from None
        except (OSError, ValueError) as exc:
            raise EmberError(f"volume {name}: unreadable ({exc})") from None
        return VolumeInfo(name, int(meta.get("size", st.st_size)), float(meta.get("created", 0)),
                          folder / IMAGE, st.st_blocks * 512)

    def exists(self, name: str) -> bool:
        return (self.dir(name) / IMAGE).is_file()

    def list(self) -> list[VolumeInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith("."):
                self._sweep(child)
                continue
            try:
                out.append(self.get(child.name))
            except EmberError:
                continue
        return out

    def _sweep(self, child: Path) -> None:
        """Remove what a killed create or remove left (``.new-*``, ``.rm-*``)."""
        try:
            old = time.time() - child.stat().st_mtime > STALE_S
        except OSError:
            return
        if child.name.startswith(".rm-") or (child.name.startswith(".new-") and old):
            shutil.rmtree(child, ignore_errors=True)

    # ---------------------------------------------------------------- write
    def create(self, name: str, size: str | int | None = None) -> tuple[VolumeInfo, bool]:
        """Make the volume unless it exists (like `docker volume create`); (info, created)."""
        check_name(name)
        nbytes = parse_size(size) if size is not None else DEFAULT_SIZE
        if nbytes < MIN_SIZE:
            raise EmberError(f"volume size {size} is too small: the minimum is 16m")
        if self.exists(name):
            return self.get(name), False
        from ember.storage.ext4 import make_ext4

        private_dir(self.root)
        work = Path(tempfile.mkdtemp(prefix=f".new-{name}-", dir=self.root))
        try:
            empty = work / "empty"
            empty.mkdir()
            make_ext4(empty, work / IMAGE, nbytes, label="ember-volume", journal=True)
            empty.rmdir()
            os.chmod(work / IMAGE, 0o600)
            atomic_write_json(work / META, {"name": name, "size": nbytes,
                                            "created": time.time()})
            try:
                os.rename(work, self.root / name)
            except OSError:
                if self.exists(name):  # made meanwhile by someone else: theirs stands
                    return self.get(name), False
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self.get(name), True

    def remove(self, name: str) -> None:
        """Delete the volume and its data (callers check it is unused)."""
        folder = self.dir(name)
        if not folder.exists():
            raise NotFoundError(f"no such volume: {name}")
        doomed = self.root / f".rm-{name}-{os.getpid()}"
        os.rename(folder, doomed)  # gone in one step; the data after
        shutil.rmtree(doomed, ignore_errors=True)
