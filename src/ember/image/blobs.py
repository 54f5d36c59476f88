"""Content-addressed blob staging and layer stream decoding.

Every import or pull first writes its blobs into a private staging folder,
hashing while it writes, and only a fully verified set is moved into the store
(see ImageStore._commit). So a bad digest or a truncated download leaves
nothing behind, and a half-imported image can never be seen by another process.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ember.errors import ImageError
from ember.image.oci import check_digest
from ember.util import private_dir

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"



@dataclass
class Pending:
    """An image ready to be committed (ImageStore.commit): its manifest is
    staged, names are normalized. Here, not in store.py, so the modules that
    add images (archive, registry, rootfs_import) need nothing of the store but
    the object they are handed."""

    manifest_digest: str
    names: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)


def blob_path(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / check_digest(digest, "blob").split(":", 1)[1]


class Staging:
    """A private folder of verified blobs waiting to be committed to the store."""

    def __init__(self, images_dir: Path) -> None:
        self.store_root = images_dir
        private_dir(images_dir)  # blobs hold whatever an image baked in (keys, tokens)
        tmp_root = images_dir / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="stage-", dir=tmp_root))
        self.digests: set[str] = set()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, digest: str) -> Path:
        """Where a blob can be read now: staged here, or already in the store."""
        staged = self.dir / check_digest(digest, "blob").split(":", 1)[1]
        return staged if staged.exists() else blob_path(self.store_root, digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def add_chunks(
        self, chunks: Iterable[bytes], expected: str | None, what: str, size: int | None = None
    ) -> tuple[str, int]:
        """Write a stream, verify it against ``expected`` and keep it; return (digest, size).

        With ``size`` (a descriptor's), a longer stream is cut off as soon as it
        passes that size and a shorter one is refused: nothing hostile fills the disk.
        """
        h = hashlib.sha256()
        written = 0
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    written += len(chunk)
                    if size is not None and written > size:
                        raise ImageError(f"{what}: larger than the {size} bytes its descriptor says")
                    h.update(chunk)
                    f.write(chunk)
            if size is not None and written != size:
                raise ImageError(f"{what}: {written} bytes, but its descriptor says {size}")
            digest = "sha256:" + h.hexdigest()
            if expected is not None and digest != expected:
                raise ImageError(f"{what}: digest mismatch (expected {expected}, got {digest})")
            os.replace(tmp, self.dir / h.hexdigest())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self.digests.add(digest)
        return digest, written

    def add_file(
        self, f: IO[bytes], expected: str | None, what: str, size: int | None = None
    ) -> tuple[str, int]:
        return self.add_chunks(bounded_chunks(f.read, size), expected, what, size)

    def add_bytes(self, data: bytes, expected: str | None, what: str) -> tuple[str, int]:
        return self.add_chunks([data], expected, what)

    def read(self, digest: str, limit: int = 16 << 20) -> bytes:
        """Read a small blob (manifest, config); the limit guards against hostile sizes."""
        path = self.path(digest)
        if path.stat().st_size > limit:
            raise ImageError(f"blob {digest}: larger than {limit} bytes, refusing to parse")
        return path.read_bytes()


def bounded_chunks(read: Callable[[int], bytes], size: int | None) -> Iterator[bytes]:
    """Chunks from ``read`` that never ask for more than one byte past ``size``.

    That one byte is how an overlong stream is noticed without reading the rest.
    """
    left = size
    while True:
        want = CHUNK if left is None else min(CHUNK, left + 1)
        chunk = read(want)
        if not chunk:
            return
        yield chunk
        if left is not None:
            left -= len(chunk)
            if left < 0:
                return


def sniff(path: Path) -> str:
    """Compression of a layer by its magic bytes: "gzip", "zstd" or "none".

    Media types lie often enough (docker save, hand-made layouts) that the bytes
    are the only thing worth trusting.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head == ZSTD_MAGIC:
        return "zstd"
    return "none"


@contextlib.contextmanager
def open_layer(path: Path, what: str) -> Iterator[IO[bytes]]:
    """Yield an uncompressed stream of a layer blob, whatever its compression."""
    kind = sniff(path)
    if kind == "gzip":
        with gzip.open(path, "rb") as f:
            yield f  # type: ignore[misc]
    elif kind == "zstd":
        if not shutil.which("zstd"):
            raise ImageError(
                f"{what}: zstd-compressed layer needs the zstd command (apt install zstd)"
            )
        proc = subprocess.Popen(
            ["zstd", "-dc", "--", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            _, err = proc.communicate()
        # -13/-9: the reader stopped early (SIGPIPE) or we had to stop it.
        if proc.returncode not in (0, -9, -13):
            raise ImageError(f"{what}: zstd failed: {err.decode(errors='replace').strip()}")
    else:
        with open(path, "rb") as f:
            yield f


def diff_id(path: Path, what: str) -> str:
    """sha256 of the uncompressed layer, as listed in the config's rootfs.diff_ids."""
    h = hashlib.sha256()
    try:
        with open_layer(path, what) as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ImageError(f"{what}: corrupt compressed layer ({exc})") from None
    return "sha256:" + h.hexdigest()
