"""Debian packages for the guest: dependency closure, download cache, extraction.

Every byte of the guest comes from Debian's own packages, fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x``: no debootstrap, no
chroot, no maintainer scripts. That keeps the build free of mounts and root
tricks, and the guest as small as the packages we name plus their libraries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ember.errors import GuestError
from ember.util import atomic_write_json

APT_LISTS = Path("/var/lib/apt/lists")

# Packages that dependencies drag in but a read-only guest that never runs a
# package manager, a pager or a shell-completion never needs.
EXCLUDED = frozenset(
    {
        "dpkg",
        "debconf",
        "install-info",
        "tar",
        "readline-common",
        "mailcap",
        "mime-support",
        "media-types",
        "perl",
        "perl-base",
        "debianutils",
        "sensible-utils",
        "base-files",
        "libc-bin",
    }
)
EXCLUDED_PREFIXES = ("perl-modules-", "libperl")

_DEP_RE = re.compile(r"^ (\||\s)(PreDepends|Depends): (.+)$")


class ListsRefreshed(GuestError):
    """A download failed on stale package lists, now refreshed: resolve again."""


@dataclass(frozen=True)
class Package:
    """One resolved binary package: what apt would download for a name."""

    name: str
    version: str
    arch: str
    sha256: str

    @property
    def deb_name(self) -> str:
        """The cache file name: apt's own naming with the epoch colon made safe."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def excluded(name: str) -> bool:
    return name in EXCLUDED or name.startswith(EXCLUDED_PREFIXES)


def _run(cmd: list[str], what: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestError(f"{what}: {cmd[0]} not found (is this a Debian host?)") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise GuestError(f"{what}: {last}")
    return proc.stdout


def parse_depends(text: str) -> dict[str, list[list[str]]]:
    """Parse ``apt-cache depends --recurse`` output into {package: [alternatives...]}.

    Each dependency is a list of acceptable names in apt's order of preference;
    a virtual name (``<foo>``) is replaced by the providers apt lists under it.
    """
    graph: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    group: list[str] = []
    continues = False
    for line in text.splitlines():
        if not line.startswith(" "):
            name = line.strip()
            current = None if name.startswith("<") else graph.setdefault(name, [])
            group, continues = [], False
            continue
        if current is None:
            continue
        m = _DEP_RE.match(line)
        if m:
            if not continues:
                group = []
                current.append(group)
            continues = m.group(1) == "|"
            target = m.group(3).strip()
            if not target.startswith("<"):
                group.append(target.split(":")[0])
        elif line.startswith("    ") and current and current[-1] is group:
            # A provider of the dependency just above (for virtual names).
            group.append(line.strip().split(":")[0])
    return graph


def closure(roots: list[str], graph: dict[str, list[list[str]]]) -> list[str]:
    """The packages ``roots`` need, taking apt's first usable alternative."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for alternatives in graph.get(name, []):
            usable = [a for a in alternatives if not excluded(a)]
            if not usable or any(a in seen for a in usable):
                continue
            todo.append(usable[0])
    return sorted(seen)


def _lists_fingerprint() -> str:
    h = hashlib.sha256()
    for p in sorted(APT_LISTS.glob("*")):
        if p.is_file() and ("_Packages" in p.name or p.name.endswith("Release")):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _apt_update() -> None:
    _run(["apt-get", "update", "-qq"], "apt-get update")


def _lists_missing() -> bool:
    """No package lists at all (a fresh container or a cleaned image)."""
    return not any(APT_LISTS.glob("*_Packages*"))


def _stale_lists(stderr: str) -> bool:
    """apt asked a mirror for a version the mirror no longer has: lists are old."""
    return "Failed to fetch" in stderr or "404" in stderr


def _show(names: list[str]) -> dict[str, Package]:
    out = _run(["apt-cache", "show", "--no-all-versions", *names], "apt-cache show")
    found: dict[str, Package] = {}
    for stanza in out.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if "Package" in fields:
            found[fields["Package"]] = Package(
                fields["Package"], fields["Version"], fields["Architecture"], fields["SHA256"]
            )
    return found


def resolve(
    roots: list[str], kernel_package: str, cache_file: Path
) -> tuple[str, dict[str, Package]]:
    """Resolve ``roots`` plus their dependencies, and the kernel image behind
    ``kernel_package`` alone (its dependencies are host tools), to the exact
    packages and versions apt would fetch. Returns (kernel package, packages).

    The answer only changes when the apt lists do, so it is remembered in
    ``cache_file`` keyed by the lists' sizes and times: a no-op ``guest build``
    then costs milliseconds instead of three apt-cache runs.
    """
    key = hashlib.sha256(
        json.dumps([sorted(roots), kernel_package, sorted(EXCLUDED), _lists_fingerprint()]).encode()
    ).hexdigest()
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return cached["kernel"], {n: Package(**p) for n, p in cached["packages"].items()}
    except (OSError, ValueError, TypeError, KeyError):
        pass
    for attempt in (1, 2):
        try:
            kernel = metapackage_target(kernel_package, "linux-image-")
            out = _run(
                [
                    "apt-cache",
                    "depends",
                    "--recurse",
                    "--no-recommends",
                    "--no-suggests",
                    "--no-conflicts",
                    "--no-breaks",
                    "--no-replaces",
                    "--no-enhances",
                    *roots,
                ],
                "apt-cache depends",
            )
            names = sorted(set(closure(roots, parse_depends(out))) | {kernel})
            packages = _show(names)
            missing = sorted(set(names) - set(packages))
            if missing:
                raise GuestError(f"apt has no package {', '.join(missing)}")
            break
        except GuestError:
            if attempt == 2 or not _lists_missing():
                raise
            _apt_update()
    atomic_write_json(
        cache_file,
        {"key": key, "kernel": kernel, "packages": {n: asdict(p) for n, p in packages.items()}},
    )
    return kernel, packages


def metapackage_target(name: str, prefix: str) -> str:
    """The real package a metapackage (``linux-image-cloud-amd64``) stands for."""
    out = _run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", name],
        f"apt-cache depends {name}",
    )
    for line in out.splitlines():
        m = _DEP_RE.match(line)
        if m and m.group(3).startswith(prefix):
            return m.group(3).split(":")[0]
    if re.match(re.escape(prefix) + r"\d", name):
        return name  # already the real package
    raise GuestError(f"guest.kernel_package {name!r}: no {prefix}* package behind it")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(packages: list[Package], cache_dir: Path) -> dict[str, Path]:
    """Fetch the .debs not already in ``cache_dir``; return name -> cached .deb.

    Downloads land in a temp folder inside the cache and are checked against
    the SHA256 apt published before they are renamed in, so the cache never
    holds a partial or foreign file.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {p.name: cache_dir / p.deb_name for p in packages}
    wanted = [p for p in packages if not paths[p.name].exists()]
    if not wanted:
        return paths
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    try:
        os.chmod(tmp, 0o755)
        specs = [f"{p.name}={p.version}" for p in wanted]
        proc = subprocess.run(
            ["apt-get", "download", "-q", *specs],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            if _stale_lists(proc.stderr):
                _apt_update()
                raise ListsRefreshed("apt-get download: the package lists were out of date")
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")]
            raise GuestError(f"apt-get download: {(errors or ['failed'])[-1].removeprefix('E: ')}")
        for p in wanted:
            got = list(tmp.glob(f"{p.name}_*.deb"))
            if len(got) != 1 or _sha256(got[0]) != p.sha256:
                raise GuestError(f"apt-get download {p.name}: missing or wrong checksum")
            os.replace(got[0], paths[p.name])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)], f"dpkg-deb -x {deb.name}")


def prune_cache(cache_dir: Path, keep: set[str]) -> None:
    """Drop cached .debs no current build uses (and stale partial downloads)."""
    if not cache_dir.is_dir():
        return
    for entry in cache_dir.iterdir():
        if entry.name.startswith(".download-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.suffix == ".deb" and entry.name not in keep:
            entry.unlink(missing_ok=True)
