"""Give Firecracker a kernel it can load: the ELF inside a bzImage.

Firecracker on x86_64 boots an uncompressed ELF ``vmlinux`` (bzImage support
arrived only in its most recent releases, and ELF stays the faster path: no
self-decompression in the guest). Ember's guest kernel is Debian's
``vmlinuz``, a bzImage. Its setup header (boot protocol >= 2.08) says where
the compressed kernel sits (``payload_offset``/``payload_length``); the
payload's magic says how it is compressed. gzip and xz/lzma are decoded with
the stdlib; LZ4 (what Debian's cloud kernel uses) and zstd with their
command-line tools. The result is cached beside the kernel (or in a fallback
directory when that is read-only), named by the kernel's content hash.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import struct
import subprocess
from pathlib import Path

from ember.errors import VMError
from ember.util import atomic_write

ELF_MAGIC = b"\x7fELF"
_TOOLS = {  # magic → command that decompresses stdin to stdout
    b"\x02\x21\x4c\x18": ["lz4", "-dc"],
    b"\x28\xb5\x2f\xfd": ["zstd", "-dc"],
}


def _payload(image: bytes, name: str) -> bytes:
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise VMError(f"kernel {name} is neither an ELF vmlinux nor a bzImage")
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x208:
        raise VMError(f"kernel {name}: boot protocol {version >> 8}.{version & 0xff} is too old "
                      "to find the compressed kernel (need 2.08)")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return image[start:start + length]


def _decompress(payload: bytes, name: str) -> bytes:
    try:
        if payload[:2] == b"\x1f\x8b":
            return gzip.decompress(payload)
        if payload[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(payload, format=lzma.FORMAT_XZ)
        if payload[:3] == b"\x5d\x00\x00":
            return lzma.decompress(payload, format=lzma.FORMAT_ALONE)
    except (OSError, lzma.LZMAError, EOFError) as exc:
        raise VMError(f"kernel {name}: cannot decompress: {exc}") from None
    tool = _TOOLS.get(payload[:4])
    if tool is None:
        raise VMError(f"kernel {name}: unknown compression (magic {payload[:4].hex()})")
    try:
        out = subprocess.run(tool, input=payload, capture_output=True, check=False)
    except FileNotFoundError:
        raise VMError(f"kernel {name} is {tool[0]}-compressed and {tool[0]} is not installed "
                      f"(apt-get install {tool[0]})") from None
    # Tools stop at the end of the frame; trailing size words make some of them complain.
    if not out.stdout.startswith(ELF_MAGIC):
        err = out.stderr.decode(errors="replace").strip().splitlines()
        raise VMError(f"kernel {name}: {tool[0]} failed: {err[-1] if err else out.returncode}")
    return out.stdout


def loadable_kernel(kernel: Path, fallback_dir: Path) -> Path:
    """An ELF kernel Firecracker can load: ``kernel`` itself, or the ELF extracted from it."""
    try:
        image = kernel.read_bytes()
    except OSError as exc:
        raise VMError(f"kernel {kernel}: {exc.strerror}") from None
    if image[:4] == ELF_MAGIC:
        return kernel
    digest = hashlib.sha256(image).hexdigest()[:16]
    name = f"fc-vmlinux-{digest}"
    for directory in (kernel.parent, fallback_dir):
        cached = directory / name
        if cached.is_file():
            return cached
    elf = _decompress(_payload(image, str(kernel)), str(kernel))
    if not elf.startswith(ELF_MAGIC):
        raise VMError(f"kernel {kernel}: the decompressed payload is not an ELF image")
    target = kernel.parent / name if os.access(kernel.parent, os.W_OK) else fallback_dir / name
    atomic_write(target, elf)
    return target
