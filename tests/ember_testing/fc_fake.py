"""A fake Firecracker for machines that cannot run the real one.

It is an executable stand-in for the ``firecracker`` binary (see
:func:`write_fake_binary`): started with ``--api-sock PATH`` it serves
Firecracker's REST API on that Unix socket, over real HTTP/1.1. Every request
is checked against the published OpenAPI description
(:mod:`ember.vmm.firecracker.contract`) and then against Firecracker's state rules:

* pre-boot calls (boot source, drives, machine config, vsock, network,
  balloon, MMDS config, logger, metrics, ...) are refused after the VM started;
* post-boot calls (``PATCH /drives``, ``PATCH /vm``, snapshot create,
  ``SendCtrlAltDel``) are refused before;
* ``InstanceStart`` works once, and only with a boot source;
* ``PUT /snapshot/load`` only on a fresh process (nothing but logger and
  metrics configured); snapshot create only on a paused VM;
* files named in requests must exist (kernel, initrd, drives, log files) and
  resource ids must be alphanumerics and underscores, as in Firecracker.

Refusals are HTTP 400 with ``{"fault_message": ...}``. There is no guest: the
vsock device is the hybrid vsock Unix socket, and a ``CONNECT <port>`` is
relayed to a Unix socket where a real agent or ttrpc server listens.

Behaviour for tests, from the environment (the driver passes it on):

``EMBER_FC_FAKE_LOG``         append one JSON line per request (verdict included)
``EMBER_FC_FAKE_GUEST``       ``PORT=UNIX_PATH[,...]``: guest vsock listeners
``EMBER_FC_FAKE_BOOT_DELAY``  seconds after start before the guest listens
``EMBER_FC_FAKE_HANG``        ``METHOD PATH``: never answer that request
``EMBER_FC_FAKE_FAIL_START``  exit at once with this message (e.g. no KVM)
``EMBER_FC_FAKE_IGNORE_CAD``  ``1``: the guest ignores Ctrl+Alt+Del
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from ember.vmm.firecracker.contract import Contract, ContractError, Operation
from ember.vmm.firecracker.contract import load as load_contract

VERSION = "1.16.1"
AFTER_START = "The requested operation is not supported after starting the microVM."
BEFORE_START = "The requested operation is not supported before starting the microVM."
LOAD_NOT_FRESH = ("Loading a microVM snapshot not allowed after configuring boot-specific "
                  "resources.")
ID_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")

PRE_BOOT = {
    ("PUT", "/boot-source"), ("PUT", "/drives/{drive_id}"), ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"), ("PUT", "/network-interfaces/{iface_id}"), ("PUT", "/vsock"),
    ("PUT", "/balloon"), ("PUT", "/mmds/config"), ("PUT", "/cpu-config"), ("PUT", "/entropy"),
    ("PUT", "/pmem/{id}"), ("PUT", "/serial"), ("PUT", "/hotplug/memory"), ("PUT", "/logger"),
    ("PUT", "/metrics"), ("PUT", "/snapshot/load"),
}
POST_BOOT = {
    ("PATCH", "/drives/{drive_id}"), ("PATCH", "/network-interfaces/{iface_id}"),
    ("PATCH", "/vm"), ("PUT", "/snapshot/create"), ("PATCH", "/pmem/{id}"),
    ("PATCH", "/hotplug/memory"), ("PATCH", "/balloon/hinting/start"),
    ("PATCH", "/balloon/hinting/stop"),
}
FRESH_OK = {("PUT", "/logger"), ("PUT", "/metrics")}  # allowed before a snapshot load


class Refused(Exception):
    """Firecracker would answer 400 with this fault message."""


def _exists(path: str, what: str, writable: bool = False) -> None:
    if not os.path.exists(path):
        raise Refused(f"{what}: No such file or directory (os error 2): {path}")
    if writable and not os.access(path, os.W_OK):
        raise Refused(f"{what}: Permission denied (os error 13): {path}")


class FakeFirecracker:
    """Firecracker's API state machine, without a guest."""

    def __init__(self, contract: Contract, instance_id: str) -> None:
        self.contract = contract
        self.id = instance_id
        self.lock = threading.RLock()
        self.state = "Not started"
        self.configured: set[tuple[str, str]] = set()
        self.boot_source: dict | None = None
        self.machine = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False}
        self.drives: dict[str, dict] = {}
        self.ifaces: dict[str, dict] = {}
        self.mmds: dict | None = None
        self.mmds_config: dict | None = None
        self.balloon: dict | None = None
        self.metrics: str | None = None
        self.logger: dict | None = None
        self.vsock: VsockDevice | None = None
        self.guest_ready_at = float("inf")
        self.exit_hook = lambda code: os._exit(code)

    @property
    def started(self) -> bool:
        return self.state != "Not started"

    # ------------------------------------------------------------ dispatch
    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, object]:
        """Answer one request: (status, JSON body or None)."""
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError as exc:
            return 400, {"fault_message": "An error occurred when deserializing the json body "
                                          f"of a request: {exc}"}
        try:
            op = self.contract.check(method, path, body, has_body=bool(raw.strip()))
            with self.lock:
                result = self._apply(op, body)
        except (ContractError, Refused) as exc:
            return 400, {"fault_message": str(exc)}
        status = 204 if result is None else 200
        try:
            self.contract.check_response(op, status, result)
        except ContractError as exc:  # a bug in the fake, not in the client
            return 500, {"fault_message": f"fake firecracker answered off-contract: {exc}"}
        return status, result

    def _apply(self, op: Operation, body: object) -> dict | None:
        key = (op.method, op.template)
        for value in op.params.values():
            if not ID_RE.match(value):
                raise Refused("API Resource IDs can only contain alphanumeric characters and "
                              "underscores.")
        if key in PRE_BOOT and self.started:
            raise Refused(AFTER_START)
        if key in POST_BOOT and not self.started:
            raise Refused(BEFORE_START)
        handler = getattr(self, "_" + op.operation_id, None)
        result = handler(op, body) if handler is not None else self._generic(op, body)
        if op.method != "GET":
            self.configured.add(key)
        return result

    def _generic(self, op: Operation, body: object) -> dict | None:
        if op.method == "GET":
            raise Refused(f"{op.template} is not implemented by the fake Firecracker")
        return None

    # ---------------------------------------------------------------- info
    def _describeInstance(self, op, body) -> dict:
        return {"app_name": "Firecracker", "id": self.id, "state": self.state,
                "vmm_version": VERSION}

    def _getFirecrackerVersion(self, op, body) -> dict:
        return {"firecracker_version": VERSION}

    def _getMachineConfiguration(self, op, body) -> dict:
        return dict(self.machine)

    def _getExportVmConfig(self, op, body) -> dict:
        out: dict = {"machine-config": dict(self.machine), "drives": list(self.drives.values()),
                     "network-interfaces": list(self.ifaces.values())}
        if self.boot_source:
            out["boot-source"] = self.boot_source
        if self.vsock:
            out["vsock"] = {"guest_cid": self.vsock.cid, "uds_path": self.vsock.path}
        if self.balloon:
            out["balloon"] = self.balloon
        return out

    # ------------------------------------------------------ configuration
    def _putLogger(self, op, body) -> None:
        if "log_path" in body:
            _exists(body["log_path"], "Cannot open the log file", writable=True)
        self.logger = body

    def _putMetrics(self, op, body) -> None:
        if self.metrics is not None:
            raise Refused("Reinitialization of metrics not allowed.")
        _exists(body["metrics_path"], "Cannot open the metrics file", writable=True)
        self.metrics = body["metrics_path"]

    def _putMachineConfiguration(self, op, body) -> None:
        if body is None:
            raise Refused("Empty PUT request.")
        if body.get("smt") and body["vcpu_count"] > 1 and body["vcpu_count"] % 2:
            raise Refused("The vCPU number is invalid! The vCPU number can only be 1 or an "
                          "even number when SMT is enabled.")
        if body["mem_size_mib"] < 1:
            raise Refused("The memory size (MiB) is either 0, or not a multiple of the "
                          "configured page size.")
        self.machine = {"smt": False, **body}

    def _putGuestBootSource(self, op, body) -> None:
        _exists(body["kernel_image_path"], "The kernel file cannot be opened")
        if "initrd_path" in body:
            _exists(body["initrd_path"], "The initrd file cannot be opened")
        self.boot_source = body

    def _putGuestDriveByID(self, op, body) -> None:
        drive_id = op.params["drive_id"]
        if body["drive_id"] != drive_id:
            raise Refused(f"The id from the path [{drive_id}] does not match the id from the "
                          f"body [{body['drive_id']}]!")
        if "path_on_host" not in body:
            raise Refused("Unable to create the block device: path_on_host is required for "
                          "a virtio block device")
        _exists(body["path_on_host"], "Unable to create the block device: BackingFile",
                writable=not body.get("is_read_only", False))
        if body["is_root_device"] and any(d["is_root_device"] for k, d in self.drives.items()
                                          if k != drive_id):
            raise Refused("A root block device already exists!")
        self.drives[drive_id] = dict(body)

    def _patchGuestDriveByID(self, op, body) -> None:
        drive_id = op.params["drive_id"]
        if body["drive_id"] != drive_id:
            raise Refused(f"The id from the path [{drive_id}] does not match the id from the "
                          f"body [{body['drive_id']}]!")
        drive = self.drives.get(drive_id)
        if drive is None:
            raise Refused(f"Invalid block device ID: {drive_id}")
        if "path_on_host" in body:
            _exists(body["path_on_host"], "Unable to patch the block device: BackingFile",
                    writable=not drive.get("is_read_only", False))
            drive["path_on_host"] = body["path_on_host"]
            print(f"[fake guest] virtio_blk {drive_id}: backing file now "
                  f"{body['path_on_host']}", flush=True)

    def _putGuestVsock(self, op, body) -> None:
        if self.vsock is not None:
            self.vsock.close()
        self.vsock = VsockDevice(self, body["guest_cid"], body["uds_path"])

    def _putEntropyDevice(self, op, body) -> None:
        return None

    def _putGuestNetworkInterfaceByID(self, op, body) -> None:
        iface_id = op.params["iface_id"]
        if body["iface_id"] != iface_id:
            raise Refused(f"The id from the path [{iface_id}] does not match the id from the "
                          f"body [{body['iface_id']}]!")
        tap = body["host_dev_name"]
        if not os.path.exists(f"/sys/class/net/{tap}/tun_flags"):
            raise Refused(f"Could not create the network device: Open tap device failed: "
                          f"{tap} is not a tap device")
        self.ifaces[iface_id] = dict(body)

    def _putBalloon(self, op, body) -> None:
        if body["amount_mib"] > self.machine["mem_size_mib"]:
            raise Refused("Amount of pages requested is too large.")
        self.balloon = dict(body)

    def _putMmdsConfig(self, op, body) -> None:
        ids = body["network_interfaces"]
        if not ids:
            raise Refused("The list of network interface IDs that allow forwarding MMDS "
                          "requests is empty.")
        for iface in ids:
            if iface not in self.ifaces:
                raise Refused(f"The list of network interface IDs provided contains at least "
                              f"one ID that does not correspond to any existing network "
                              f"interface: {iface}")
        self.mmds_config = body

    def _putMmds(self, op, body) -> None:
        self.mmds = body or {}

    def _patchMmds(self, op, body) -> None:
        if self.mmds is None:
            raise Refused("The MMDS data store is not initialized.")
        self.mmds.update(body or {})

    def _getMmds(self, op, body) -> dict:
        if self.mmds is None:
            raise Refused("The MMDS data store is not initialized.")
        return self.mmds

    # ----------------------------------------------------------- actions
    def _createSyncAction(self, op, body) -> None:
        action = body["action_type"]
        if action == "InstanceStart":
            if self.started:
                raise Refused(AFTER_START)
            if self.boot_source is None:
                raise Refused("Start microvm error: Missing kernel configuration.")
            self.state = "Running"
            delay = float(os.environ.get("EMBER_FC_FAKE_BOOT_DELAY", "0") or 0)
            self.guest_ready_at = time.monotonic() + delay
            print(f"[fake guest] booting: {self.boot_source.get('boot_args', '')}", flush=True)
        elif action == "SendCtrlAltDel":
            if not self.started:
                raise Refused(BEFORE_START)
            if os.environ.get("EMBER_FC_FAKE_IGNORE_CAD") != "1":
                print("[fake guest] Ctrl+Alt+Del: rebooting, so Firecracker exits", flush=True)
                threading.Timer(0.05, self.exit_hook, args=(0,)).start()
        elif action == "FlushMetrics":
            if self.metrics is None:
                raise Refused("The metrics system is not initialized.")
        return None

    def _patchVm(self, op, body) -> None:
        self.state = "Paused" if body["state"] == "Paused" else "Running"

    # --------------------------------------------------------- snapshots
    def _createSnapshot(self, op, body) -> None:
        if self.state != "Paused":
            raise Refused("Create snapshot error: Cannot save the microVM state: the microVM "
                          "is not paused.")
        saved = {"fake_firecracker_snapshot": 1, "machine": self.machine,
                 "boot_source": self.boot_source, "drives": self.drives,
                 "ifaces": self.ifaces, "mmds": self.mmds, "balloon": self.balloon,
                 "vsock": {"guest_cid": self.vsock.cid, "uds_path": self.vsock.path}
                 if self.vsock else None}
        try:
            Path(body["snapshot_path"]).write_text(json.dumps(saved))
            Path(body["mem_file_path"]).write_bytes(b"FAKE-GUEST-MEMORY\n")
        except OSError as exc:
            raise Refused(f"Create snapshot error: Cannot write the snapshot file: "
                          f"{exc.strerror}: {exc.filename}") from None

    def _loadSnapshot(self, op, body) -> None:
        if self.configured - FRESH_OK:
            raise Refused(LOAD_NOT_FRESH)
        if ("mem_file_path" in body) == ("mem_backend" in body):
            raise Refused("Load snapshot error: exactly one of mem_file_path and mem_backend "
                          "must be given.")
        mem = body.get("mem_file_path") or body["mem_backend"]["backend_path"]
        _exists(mem, "Load snapshot error: Failed to open the memory file")
        try:
            saved = json.loads(Path(body["snapshot_path"]).read_text())
            if saved.get("fake_firecracker_snapshot") != 1:
                raise ValueError("not a snapshot")
        except (OSError, ValueError) as exc:
            raise Refused(f"Load snapshot error: Cannot deserialize the microVM state: {exc}") from None
        for drive in saved["drives"].values():
            _exists(drive["path_on_host"], "Load snapshot error: Cannot restore the block "
                    "device: BackingFile")
        self.machine, self.boot_source = saved["machine"], saved["boot_source"]
        self.drives, self.ifaces = saved["drives"], saved["ifaces"]
        self.mmds, self.balloon = saved["mmds"], saved["balloon"]
        if saved["vsock"]:
            uds = (body.get("vsock_override") or {}).get("uds_path", saved["vsock"]["uds_path"])
            self.vsock = VsockDevice(self, saved["vsock"]["guest_cid"], uds)
        self.state = "Running" if body.get("resume_vm") else "Paused"
        self.guest_ready_at = time.monotonic()


class VsockDevice:
    """The host end of hybrid vsock: ``CONNECT <port>`` relayed to a guest listener."""

    def __init__(self, vm: FakeFirecracker, cid: int, path: str) -> None:
        self.vm, self.cid, self.path = vm, cid, path
        self.guest = _guest_listeners()
        self._next_port = 1 << 30
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(path)
        except OSError as exc:
            self.listener.close()
            raise Refused(f"Cannot create backend for vsock device: UnixBind({exc.strerror}): "
                          f"{path}") from None
        self.listener.listen(16)
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        line = bytearray()
        try:
            while not line.endswith(b"\n") and len(line) < 64:
                chunk = conn.recv(1)
                if not chunk:
                    break
                line += chunk
            m = re.fullmatch(rb"CONNECT (\d+)\n", bytes(line))
            target = self.guest.get(int(m.group(1))) if m else None
            vm = self.vm
            if target is None or vm.state != "Running" or time.monotonic() < vm.guest_ready_at:
                conn.close()  # no guest listener: Firecracker drops the connection
                return
            guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            guest.connect(target)
        except OSError:
            conn.close()
            return
        self._next_port += 1
        conn.sendall(f"OK {self._next_port}\n".encode())
        for a, b in ((conn, guest), (guest, conn)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
        try:
            s.shutdown(how)
        except OSError:
            pass


def _guest_listeners() -> dict[int, str]:
    out = {}
    for item in filter(None, os.environ.get("EMBER_FC_FAKE_GUEST", "").split(",")):
        port, _, path = item.partition("=")
        out[int(port)] = path
    return out


# ------------------------------------------------------------------ HTTP
class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fake: FakeFirecracker
    log_path: str | None = None
    hang: str = ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.server.hang == f"{self.command} {self.path}":
            time.sleep(3600)
        status, body = self.server.fake.handle(self.command, self.path, raw)
        self._log(raw, status, body)
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _log(self, raw: bytes, status: int, body: object) -> None:
        if not self.server.log_path:
            return
        try:
            req = json.loads(raw) if raw.strip() else None
        except ValueError:
            req = raw.decode("utf-8", "replace")
        entry = {"method": self.command, "path": self.path, "body": req, "status": status,
                 "fault": body.get("fault_message") if isinstance(body, dict) and status >= 300
                 else None}
        with open(self.server.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _any


def read_log(path: str | os.PathLike) -> list[dict]:
    """The requests a fake recorded, oldest first."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_fake_binary(directory: Path, name: str = "firecracker",
                      env: dict[str, str] | None = None) -> Path:
    """An executable ``firecracker`` that runs this fake with the current interpreter.

    ``env`` is written into the script, for runs where the environment does
    not reach it (ember-jailer execs the VMM with an empty one).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    preset = (f"import json, os\nos.environ.update(json.loads({json.dumps(env)!r}))\n"
              if env else "")
    # tests/ (where ember_testing lives) and the ember this process runs: the
    # jailer execs with an empty environment, so PYTHONPATH does not reach it.
    import ember

    paths = [str(Path(__file__).resolve().parents[1]), str(Path(ember.__file__).resolve().parents[1])]
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path[:0] = {paths!r}\n{preset}"
                    "from ember_testing.fc_fake import main\nsys.exit(main())\n")
    path.chmod(0o755)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="firecracker", exit_on_error=False)
    parser.add_argument("--api-sock")
    parser.add_argument("--id", default="anonymous-instance")
    parser.add_argument("--version", action="store_true")
    try:
        args = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        print(f"Arguments parsing error: {exc}", file=sys.stderr)
        return 153
    if args.version:
        print(f"Firecracker v{VERSION} (ember test fake: serves the API, runs no VM)")
        return 0
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
        print(f"Invalid instance ID: {args.id}", file=sys.stderr)
        return 1
    if not args.api_sock:
        print("Arguments parsing error: this fake needs --api-sock", file=sys.stderr)
        return 153
    if os.environ.get("EMBER_FC_FAKE_FAIL_START"):
        print(os.environ["EMBER_FC_FAKE_FAIL_START"], file=sys.stderr)
        return 1
    if os.path.exists(args.api_sock):
        print(f"Failed to open the API socket at: {args.api_sock}. Check that it is not "
              "already used.", file=sys.stderr)
        return 1
    server = _Server(args.api_sock, _Handler)
    server.fake = FakeFirecracker(load_contract(), args.id)
    server.log_path = os.environ.get("EMBER_FC_FAKE_LOG")
    server.hang = os.environ.get("EMBER_FC_FAKE_HANG", "")
    server.serve_forever(poll_interval=0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
