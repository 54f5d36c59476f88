"""The Firecracker backend: driver (REST API over a Unix socket), the API client,
Firecracker's published OpenAPI contract, drive placeholders, the jail layout
and kernel format. Everything Firecracker-specific lives in this package;
the rest of Ember sees :class:`FirecrackerVMM` through :class:`ember.vmm.base.VMM`."""

from ember.vmm.firecracker.driver import FirecrackerOptions, FirecrackerVMM

__all__ = ["FirecrackerOptions", "FirecrackerVMM"]
