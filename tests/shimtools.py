"""Shared set-up for the shim's end-to-end tests (test_shim_containerd, test_cri) and
bench/containerd.py: a private containerd that finds containerd-shim-ember-v2,
busybox images imported into it, and checks that nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psutil
from ember_testing.containerd import ContainerdInstance
from ember_testing.mounts import loops_under, mounts_under
from ember_testing.oci import Entry, build_oci_archive, busybox_layer

RUNTIME = "io.containerd.ember.v2"
BUSYBOX = "localhost/ember-test/busybox:1"
PAUSE = "localhost/ember-test/pause:1"
VENV_BIN = str(Path(sys.executable).parent)
CNI_BIN = "/usr/lib/cni"


def shim_env(state_dir: Path) -> dict[str, str]:
    """containerd's environment: the shim on PATH, Ember's state in a test folder."""
    env = {"EMBER_STATE_DIR": str(state_dir), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    for key in ("EMBER_DATA_DIR", "EMBER_CONFIG", "EMBER_ACCEL"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


SNIPPET = Path(__file__).resolve().parent.parent / "deploy/containerd/ember-runtime.toml"


def cri_config(work: Path, config_path: str) -> str:
    """The shipped deploy/containerd/ember-runtime.toml, with this test's Ember config
    as ConfigPath, plus what a test node needs (see DESIGN.md §3): a local pause
    image and a CNI configuration that gives the pod an eth0 (ptp + host-local)."""
    conf_dir = work / "cni-conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "10-ember-test.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "ember-test",
        "plugins": [{"type": "ptp", "ipMasq": False,
                     "ipam": {"type": "host-local", "subnet": "10.77.0.0/24",
                              "dataDir": str(work / "cni-ipam")}},
                    {"type": "loopback"}]}))
    text = SNIPPET.read_text().replace("version = 2\n", "")
    text = text.replace('ConfigPath = "/etc/ember/config.toml"', f'ConfigPath = "{config_path}"')
    header = '[plugins."io.containerd.grpc.v1.cri"]\n'
    assert header in text, "the deploy snippet lost its CRI table"
    text = text.replace(header, f'{header}  sandbox_image = "{PAUSE}"\n', 1)
    return text + f"""
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{conf_dir}"
"""


def import_images(c: ContainerdInstance, work: Path) -> None:
    """busybox (sh as command) and a pause image for CRI sandboxes."""
    bb = build_oci_archive(work / "busybox.tar", BUSYBOX, [busybox_layer()], cmd=["/bin/sh"])
    pause = build_oci_archive(work / "pause.tar", PAUSE,
                              [busybox_layer(), [Entry("/etc/pause-image", b"ember\n")]],
                              cmd=["/bin/sleep", "2147483647"])
    for tar in (bb, pause):
        c.ctr("images", "import", str(tar))
        os.unlink(tar)


def _toml(data: dict, prefix: str = "") -> str:
    """A TOML writer for Ember's config shape (scalars and nested tables)."""
    def scalar(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        return json.dumps(str(v))
    lines = [f"{k} = {scalar(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{prefix}{k}]")
            lines.append(_toml(v, f"{prefix}{k}."))
    return "\n".join(lines)


def ember_config_file(work: Path, state: Path, jailer: bool | None = None) -> Path:
    """$EMBER_CONFIG's settings plus this test's state dir and jail folder.

    Jails below the test folder make the jailed QEMU recognisable (its root is
    there) and leave the host's /srv/jailer alone.
    """
    data: dict = {}
    if os.environ.get("EMBER_CONFIG"):
        data = tomllib.loads(Path(os.environ["EMBER_CONFIG"]).read_text())
    data["state_dir"] = str(state)
    data.setdefault("jailer", {})["chroot_base_dir"] = str(work / "jail")
    if jailer is not None:
        data["jailer"]["enabled"] = jailer
    path = work / "ember.toml"
    path.write_text(_toml(data) + "\n")
    return path


def start_containerd(work: Path, cri: bool = False) -> ContainerdInstance:
    """ctr tests pass Ember's state dir in the environment; CRI passes it through
    the runtime options' ConfigPath, as a cluster would."""
    state = work / "st"
    state.mkdir(parents=True, exist_ok=True)
    env = shim_env(state)
    config = str(ember_config_file(work, state))
    extra = ""
    if cri:
        extra = cri_config(work, config)
        env.pop("EMBER_STATE_DIR", None)
    else:
        env["EMBER_CONFIG"] = config
    c = ContainerdInstance(work / "ctrd", extra, cri=cri, env=env,
                           namespace="k8s.io" if cri else "ember-test")
    try:
        import_images(c, work)
    except BaseException:
        c.stop()
        raise
    return c


def new_workdir() -> Path:
    """Short paths: Unix sockets below it must stay under 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="emb-ct-", dir="/tmp"))


def ember_processes(work: Path) -> list[psutil.Process]:
    """QEMU and shim processes that belong to this test folder."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # dead already; its parent reaps it
        try:
            root = os.readlink(f"/proc/{p.pid}/root")  # a jailed VMM's root is its jail
        except OSError:
            root = ""
        ours = str(work) in cmd or root.startswith(str(work))
        if ours and any(k in cmd for k in ("qemu-system", "ember.shim", "ember-jailer",
                                           "ember.jailer")):
            p.info["cmd"] = cmd
            found.append(p)
    return found


def vmms(work: Path) -> list[psutil.Process]:
    """This test folder's QEMU processes (jailed or not)."""
    return [p for p in ember_processes(work) if p.info["cmdline"]
            and os.path.basename(p.info["cmdline"][0]).startswith("qemu-system")]


def shims(work: Path) -> list[psutil.Process]:
    return [p for p in ember_processes(work) if "ember.shim" in p.info["cmd"]]


def leftovers(work: Path) -> list[str]:
    """What the code under test left running or mounted below work."""
    out = [f"process {p.pid}: {p.info['cmd'][:120]}" for p in ember_processes(work)]
    out += [f"mount {m}" for m in mounts_under(work)]
    out += [f"loop {d}" for d in loops_under(work)]
    shim_dir = work / "st" / "shim"
    if shim_dir.is_dir():
        out += [f"pod folder {p}" for p in shim_dir.iterdir()]
    out += [f"jail {p}" for p in (work / "jail").glob("*/*")]
    return out


def kill_all(work: Path) -> None:
    for p in ember_processes(work):
        try:
            p.kill()
        except psutil.Error:
            pass


def remove_workdir(work: Path) -> None:
    subprocess.run(["rm", "-rf", str(work)], check=False)


@contextlib.contextmanager
def private_containerd(cri: bool = False) -> Iterator[tuple[ContainerdInstance, Path]]:
    """A containerd with the test images; afterwards everything below its folder is gone."""
    work = new_workdir()
    try:
        c = start_containerd(work, cri=cri)
        try:
            yield c, work
        finally:
            c.stop()
    finally:
        kill_all(work)
        remove_workdir(work)


def discard_pod(client, pod_id: str) -> None:
    """Stop and remove a CRI pod, ignoring errors (cleanup after a failed test)."""
    for step in (client.stop_pod, client.remove_pod):
        try:
            step(pod_id)
        except Exception:  # noqa: BLE001 - best effort
            pass
