"""How the agent reaches the host: virtio-serial, vsock, or a Unix socket in tests.

A virtio-serial port has no connections: reads return EOF whenever the host
end is closed (the port is also readable before the host ever connects), and
the host may come back at any time. So the agent keeps the port open and
serves it again after EOF or a read error, a moment later, forever.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import time

from ember.ttrpc import Server, Transport

log = logging.getLogger("ember.agent.channel")

PORT_NAME = "agent.0"
VSOCK_PORT = 1024
RETRY_S = 0.05


VIRTIO_ID_CONSOLE = 0x0003


def has_virtio_console() -> bool:
    """Is there a virtio-serial device at all (QEMU yes, Firecracker no)?"""
    for path in glob.glob("/sys/bus/virtio/devices/*/device"):
        try:
            with open(path) as f:
                if int(f.read().strip(), 16) == VIRTIO_ID_CONSOLE:
                    return True
        except (OSError, ValueError):
            continue
    return False


def find_virtio_port(name: str = PORT_NAME, timeout: float = 10.0) -> str | None:
    """/dev/vportNpM of the virtio-serial port called name, if there is one.

    Ports are announced by the device after the driver binds, so they can lag
    behind module loading: wait for one, but only if a virtio-serial device
    exists (under Firecracker there is none and vsock is used at once).
    """
    deadline = time.monotonic() + timeout
    while True:
        for path in glob.glob("/sys/class/virtio-ports/*/name"):
            try:
                with open(path) as f:
                    if f.read().strip() == name:
                        dev = "/dev/" + path.split("/")[-2]
                        if os.path.exists(dev):
                            return dev
            except OSError:
                continue
        if time.monotonic() >= deadline or not has_virtio_console():
            return None
        time.sleep(0.05)


def serve_port(server: Server, path: str) -> None:
    """Serve a character device (virtio-serial port) across host reconnects.

    The port is opened once and kept open; each host session gets a duplicate
    of the descriptor. Opening the port again would discard what is waiting in
    it (the kernel's virtio console drops a port's buffered input on open): a
    host that connects while the agent reopens, as right after a snapshot
    restore, would lose its first request and wait out its deadline.
    """
    fd = -1
    idle = False
    while not server.stopped:
        if fd < 0:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                log.warning("cannot open %s: %s", path, e)
                time.sleep(1)
                continue
        started = time.monotonic()
        try:
            session = os.dup(fd)
        except OSError as e:
            log.warning("cannot use %s: %s", path, e)
            os.close(fd)
            fd = -1
            time.sleep(1)
            continue
        server.serve_transport(Transport(fd=session))  # closes the duplicate when it returns
        # EOF right away means no host on the other end yet: poll quietly.
        quick = time.monotonic() - started < RETRY_S * 2
        if not quick or not idle:
            log.info("host side of %s %s", path, "not connected" if quick else "disconnected")
        idle = quick
        time.sleep(RETRY_S)
    if fd >= 0:
        os.close(fd)


def listen_vsock(port: int = VSOCK_PORT) -> socket.socket:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, port))
    s.listen(16)
    return s


def serve(server: Server, channel: str, listen_unix: str | None) -> None:
    """Serve on the chosen channel until the server is shut down."""
    if listen_unix:
        from ember.ttrpc import bind_unix

        listener = bind_unix(listen_unix)
        log.info("listening on unix:%s", listen_unix)
        print("EMBER-AGENT-READY", flush=True)
        try:
            server.serve_listener(listener)
        finally:
            listener.close()
            try:
                os.unlink(listen_unix)
            except FileNotFoundError:
                pass
        return
    if channel.startswith("vsock:"):
        port = int(channel.split(":", 1)[1])
        path = None
    elif channel == "auto":
        path = find_virtio_port()
        port = VSOCK_PORT
    else:
        path = channel
    if path:
        log.info("serving on %s", path)
        print("EMBER-AGENT-READY", flush=True)
        serve_port(server, path)
        return
    listener = listen_vsock(port)
    log.info("listening on vsock port %d", port)
    print("EMBER-AGENT-READY", flush=True)
    server.serve_listener(listener)
