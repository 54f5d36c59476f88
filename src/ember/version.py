"""The version of Ember (its own module: the guest agent reports it, and must
not import the package root, whose lazy re-exports reach the host side)."""

__version__ = "0.1.0"
