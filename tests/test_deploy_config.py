"""The documented set-up works as written (README's setup.sh + docs/containerd.md).

`scripts/setup.sh` installs `/etc/ember/config.toml` with `ember config
default --write` when there is none: every key, commented out, at its
default, generated from `ember.config` so the file cannot drift from what the
loader accepts. The containerd snippet (deploy/containerd/ember-runtime.toml)
points `ConfigPath` there. The last test merges the snippet into a private
containerd exactly as docs/containerd.md says, with `ConfigPath` at a file
made by setup.sh's own command, and runs a pod with handler `ember` whose
container prints a line into its CRI log.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import tomllib
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import ember_bin
from ember_testing.containerd import ContainerdInstance
from shimtools import (
    BUSYBOX,
    PAUSE,
    cri_config,
    import_images,
    kill_all,
    new_workdir,
    remove_workdir,
    shim_env,
)
from test_cri import _wait

from ember.config import KEY_HELP, Config, default_config_text, load_config
from ember.cri import api_pb2 as api
from ember.cri.client import CRIClient

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "scripts/setup.sh"
DEFAULT_PATH = "/etc/ember/config.toml"


@pytest.fixture
def no_env_overrides(monkeypatch):
    for key in ("EMBER_CONFIG", "EMBER_DATA_DIR", "EMBER_STATE_DIR", "EMBER_ACCEL",
                "EMBER_FIRECRACKER_BIN"):
        monkeypatch.delenv(key, raising=False)


def _settings(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("source")
    return d


def _keys(obj: object, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _keys(value, f"{f.name}.")
        elif f.name != "source":
            out.add(prefix + f.name)
    return out


def _uncommented(text: str) -> str:
    """The file with every commented-out `key = value` line switched on."""
    return re.sub(r"^# ([a-z_]+ = .*)$", r"\1", text, flags=re.M)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_default_file_loads_to_exactly_the_defaults(tmp_path, no_env_overrides):
    path = tmp_path / "config.toml"
    path.write_text(default_config_text())
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert _settings(cfg) == _settings(Config())


def test_every_key_is_shown_with_its_default_and_help(tmp_path, no_env_overrides):
    text = default_config_text()
    switched_on = _uncommented(text)
    shown = _flat(tomllib.loads(switched_on))
    assert set(shown) == _keys(Config()), "every key, and only real keys"
    assert set(KEY_HELP) == _keys(Config()), "every key needs its line of help"
    # The values shown are the defaults: switching every line on changes nothing.
    path = tmp_path / "config.toml"
    path.write_text(switched_on)
    assert _settings(load_config(path)) == _settings(Config())
    for key, help_text in KEY_HELP.items():
        name = key.rsplit(".", 1)[-1]
        assert re.search(rf"^# {re.escape(help_text)}\n# {name} = ", text, re.M), key


def _setup_command() -> list[str]:
    """setup.sh's own line that installs the default config file."""
    lines = [ln.strip() for ln in SETUP.read_text().splitlines()
             if ln.strip().startswith("ember config default")]
    assert len(lines) == 1, "setup.sh must install the default config with one command"
    argv = shlex.split(lines[0])
    assert argv[-1] == DEFAULT_PATH, "setup.sh must install it where the snippet points"
    return argv


def make_config_like_setup(dest: Path) -> Path:
    """Run setup.sh's command, with ``dest`` in place of /etc/ember/config.toml."""
    argv = _setup_command()
    argv[0], argv[-1] = ember_bin(), str(dest)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return dest


def test_setup_installs_the_default_file_and_never_overwrites(tmp_path, no_env_overrides):
    path = make_config_like_setup(tmp_path / "etc/ember/config.toml")
    assert path.read_text() == default_config_text()
    assert path.stat().st_mode & 0o777 == 0o644
    assert _settings(load_config(path)) == _settings(Config())
    # A second set-up run leaves an edited file alone, and says so.
    path.write_text('[vm]\nmemory_mib = 1024\n')
    argv = [ember_bin(), "config", "default", "--write", str(path)]
    again = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "left unchanged" in again.stdout
    assert path.read_text() == '[vm]\nmemory_mib = 1024\n'
    assert [p.name for p in path.parent.iterdir()] == ["config.toml"]  # no temp files


def test_unwritable_place_is_one_line_of_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([ember_bin(), "config", "default", "--write",
                           str(blocker / "config.toml")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 125
    assert proc.stderr.strip().splitlines() == [
        f"ember: error: cannot write {blocker / 'config.toml'}: {blocker} is not a directory"]


def test_default_command_prints_the_file():
    proc = subprocess.run([ember_bin(), "config", "default"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0
    assert proc.stdout == default_config_text()


# ------------------------------------------------- containerd, as documented


def _pod_folders(state_dir: Path) -> set[str]:
    shim_dir = state_dir / "shim"
    return {p.name for p in shim_dir.iterdir()} if shim_dir.is_dir() else set()


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.containerd
@pytest.mark.timeout(900)
def test_documented_containerd_setup_runs_a_pod(guest_assets):
    """docs/containerd.md's steps: the snippet merged into containerd's config,
    ConfigPath at setup.sh's default file, a pod with handler `ember`."""
    work = new_workdir()
    try:
        config = make_config_like_setup(work / "etc-ember/config.toml")
        # cri_config: the shipped snippet as it is, ConfigPath at `config`, plus
        # what any node has (a pause image, a CNI network).
        extra = cri_config(work, str(config))
        assert f'ConfigPath = "{config}"' in extra and PAUSE in extra
        env = shim_env(work / "unused")
        env.pop("EMBER_STATE_DIR")  # the shim's state dir is the config file's
        env.pop("EMBER_CONFIG", None)
        state_dir = load_config(config).state_dir
        before = _pod_folders(state_dir)
        logs = work / "logs"
        logs.mkdir()
        with ContainerdInstance(work / "ctrd", extra, cri=True, env=env,
                                namespace="k8s.io") as c:
            import_images(c, work)
            with CRIClient(c.address) as client:
                pod_config = client.pod_config("documented-setup")
                pod_config.log_directory = str(logs)
                pod = client.runtime.RunPodSandbox(api.RunPodSandboxRequest(
                    config=pod_config, runtime_handler="ember"), timeout=300).pod_sandbox_id
                try:
                    assert len(_pod_folders(state_dir) - before) == 1, \
                        "the pod must run under the default config's state_dir"
                    message = f"hello from ember {uuid.uuid4().hex[:8]}"
                    ctr = client.runtime.CreateContainer(api.CreateContainerRequest(
                        pod_sandbox_id=pod, sandbox_config=pod_config,
                        config=api.ContainerConfig(
                            metadata=api.ContainerMetadata(name="hello", attempt=0),
                            image=api.ImageSpec(image=BUSYBOX), log_path="hello.log",
                            command=["sh", "-c", f"echo {message}; uname -r"],
                            linux=api.LinuxContainerConfig())), timeout=300).container_id
                    client.start_container(ctr)
                    assert _wait(lambda: client.container_status(ctr).state
                                 == api.CONTAINER_EXITED, 120)
                    assert client.container_status(ctr).exit_code == 0
                    log = (logs / "hello.log").read_text()
                    # CRI log lines: TIMESTAMP STREAM TAG TEXT
                    printed = [line.split(" ", 3)[3] for line in log.splitlines()]
                    assert printed == [message, guest_assets.kernel_release], log
                finally:
                    client.stop_pod(pod)
                    client.remove_pod(pod)
                assert _wait(lambda: _pod_folders(state_dir) <= before, 60), \
                    "the pod folder must go with the pod"
                assert _wait(lambda: not [p for p in psutil.process_iter(["cmdline"])
                                          if c.address in (p.info["cmdline"] or [])], 60), \
                    "the pod's shim must exit with the pod"
    finally:
        kill_all(work)
        remove_workdir(work)
