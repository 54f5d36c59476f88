"""Prometheus metrics for the node's sandboxes: ``ember metrics serve``.

:mod:`ember.metrics.targets` finds what runs on the node (``ember run``
sandboxes from their records, containerd pods from the shim's pod folders,
both read only), :mod:`ember.metrics.collector` measures them (host side:
the VMM process and its cgroup; guest side: one ``GuestStats`` agent call per
sandbox per scrape, in parallel, each bounded by a timeout) and
:mod:`ember.metrics.server` serves the Prometheus text format over HTTP.

The defaults live here, so the CLI shows them without importing the collector
(prometheus_client, protobuf): every `ember` command would pay for it.
"""

DEFAULT_TIMEOUT = 0.5  # seconds one sandbox's guest may take to answer a scrape
DEFAULT_LISTEN = "127.0.0.1:8090"
