"""Helpers shared by Ember's tests and benchmarks: real containerd, real
snapshotter processes, OCI image builders, and mount/loop-device hygiene.

They live in the package (not in tests/) so benchmarks and other test modules
can import them the same way.
"""
