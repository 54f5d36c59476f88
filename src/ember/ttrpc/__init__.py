"""Ember's ttrpc: containerd's lightweight RPC protocol, stdlib + protobuf only.

Used by the guest agent (no grpcio in the guest), the host agent client, the
sandbox monitor (which forwards raw frames, hence the public framing helpers)
and the containerd shim.
"""

from ember.ttrpc.client import Client
from ember.ttrpc.errors import Code, ConnectionClosed, FrameTooLarge, TTRPCError
from ember.ttrpc.framing import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    Frame,
    Transport,
    encode_frame,
    read_frame,
    write_frame,
)
from ember.ttrpc.server import Context, Server, bind_unix, status_response

__all__ = [
    "Client", "Code", "ConnectionClosed", "Context", "Frame", "FrameTooLarge", "HEADER_SIZE",
    "MAX_PAYLOAD", "Server", "TTRPCError", "TYPE_DATA", "TYPE_REQUEST", "TYPE_RESPONSE",
    "Transport", "bind_unix", "encode_frame", "read_frame", "status_response", "write_frame",
]
