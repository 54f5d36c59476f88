"""The annotations containerd's CRI plugin and CRI-O put on OCI bundles, as the
shim, the node event log and the metrics read them (one list of names)."""

ANN_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ANN_CONTAINER_NAME = "io.kubernetes.cri.container-name"
ANN_POD_NAME = "io.kubernetes.cri.sandbox-name"
ANN_POD_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
# containerd 1.7+ and CRI-O say which runtime handler (RuntimeClass) runs the
# pod; containerd 1.6 does not.
ANN_HANDLERS = ("io.kubernetes.cri.runtime-handler", "io.kubernetes.cri-o.RuntimeHandler")
CRIO_POD_NAME = "io.kubernetes.pod.name"
CRIO_POD_NAMESPACE = "io.kubernetes.pod.namespace"
CRIO_CONTAINER_NAME = "io.kubernetes.container.name"
