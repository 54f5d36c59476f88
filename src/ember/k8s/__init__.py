"""Kubernetes integration: the pod-feature matrix, RuntimeClasses with measured
overhead, and the admission webhook that routes pods to them."""
