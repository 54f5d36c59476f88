"""gRPC front of the snapshotter: containerd.services.snapshots.v1.Snapshots.

containerd's proxy client turns gRPC status codes back into its error classes
(NotFound, AlreadyExists, FailedPrecondition...), and its unpacker relies on
them (AlreadyExists means another unpack got there first). Unexpected
failures become INTERNAL with a one-line message; the server keeps serving.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from ember.snapshotter import core
from ember.snapshotter.backend import MountSpec, is_disk_full
from ember.snapshotter.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from ember.snapshotter.store import ACTIVE, COMMITTED, VIEW

log = logging.getLogger(__name__)

STATUS = {
    core.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    core.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    core.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    core.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    core.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    core.INTERNAL: grpc.StatusCode.INTERNAL,
}

# The store's snapshot kinds as containerd's enum names them (the same numbers).
KINDS = {VIEW: snapshots_pb2.VIEW, ACTIVE: snapshots_pb2.ACTIVE, COMMITTED: snapshots_pb2.COMMITTED}


def _mounts(specs: list[MountSpec]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in specs]


def _info(i: core.Info) -> snapshots_pb2.Info:
    msg = snapshots_pb2.Info(name=i.name, parent=i.parent, kind=KINDS[i.kind], labels=i.labels)
    msg.created_at.FromNanoseconds(i.created)
    msg.updated_at.FromNanoseconds(i.updated)
    return msg


def _guard(method):
    """Map a call's failures to gRPC statuses; never let one kill the server."""

    def wrapper(self, request, context):
        start = time.monotonic()
        try:
            reply = method(self, request, context)
            log.debug("%s %r: %.1f ms", method.__name__, getattr(request, "key", ""),
                      (time.monotonic() - start) * 1000)
            return reply
        except core.SnapshotError as exc:
            log.info("%s: %s", method.__name__, exc.message)
            context.abort(STATUS[exc.code], exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the server down
            if is_disk_full(exc):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"snapshot storage is full: {exc}")
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {exc}")

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    """Translates protobuf requests to :class:`core.Snapshotter` calls."""

    def __init__(self, sn: core.Snapshotter) -> None:
        self.sn = sn

    @_guard
    def Prepare(self, request, context):
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_guard
    def View(self, request, context):
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_guard
    def Mounts(self, request, context):
        return snapshots_pb2.MountsResponse(mounts=_mounts(self.sn.mounts(request.key)))

    @_guard
    def Commit(self, request, context):
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_guard
    def Remove(self, request, context):
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_guard
    def Stat(self, request, context):
        return snapshots_pb2.StatSnapshotResponse(info=_info(self.sn.stat(request.key)))

    @_guard
    def Update(self, request, context):
        info = self.sn.update(request.info.name, dict(request.info.labels),
                              list(request.update_mask.paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(info))

    def List(self, request, context):
        # A generator: errors must be raised while iterating, so guard inline.
        try:
            infos = list(self.sn.list(list(request.filters)))
        except core.SnapshotError as exc:
            context.abort(STATUS[exc.code], exc.message)
        except Exception as exc:  # noqa: BLE001
            log.exception("List failed")
            context.abort(grpc.StatusCode.INTERNAL, f"List: {exc}")
        # containerd's proxy sends batches; 100 per message keeps each small.
        for i in range(0, len(infos), 100):
            yield snapshots_pb2.ListSnapshotsResponse(info=[_info(x) for x in infos[i:i + 100]])

    @_guard
    def Usage(self, request, context):
        size, inodes = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    @_guard
    def Cleanup(self, request, context):
        self.sn.cleanup()
        return empty_pb2.Empty()


def serve(sn: core.Snapshotter, address: Path, workers: int = 8) -> grpc.Server:
    """Start serving on the Unix socket ``address`` (replacing a stale one)."""
    address.parent.mkdir(parents=True, exist_ok=True)
    if address.exists() or address.is_symlink():
        address.unlink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(sn), server)
    if server.add_insecure_port(f"unix:{address}") == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    os.chmod(address, 0o600)
    return server
