"""Ember: run every container or pod inside its own micro-VM.

The public Python API lives in :mod:`ember.api`; ``ember.Sandbox`` and
``ember.run`` are re-exported here lazily so that light modules (the guest
agent, the ttrpc code) can import ``ember`` without pulling in the host side.
"""

from __future__ import annotations

from ember.version import __version__

__all__ = ["Sandbox", "Volume", "run", "EmberError", "__version__"]


def __getattr__(name: str):  # PEP 562: keep `import ember` cheap inside the guest
    if name in ("Sandbox", "run"):
        from ember import api

        return getattr(api, name)
    if name == "Volume":
        from ember.sandbox.volumes import Volume

        return Volume
    if name == "EmberError":
        from ember.errors import EmberError

        return EmberError
    raise AttributeError(name)
