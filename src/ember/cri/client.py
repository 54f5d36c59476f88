"""A small CRI v1 client: what a kubelet says to containerd's CRI plugin, from Python.

Used by Ember's tests and benchmark to drive pods through containerd exactly
as Kubernetes would (RunPodSandbox with a runtime handler, CreateContainer,
ExecSync...), without a kubelet::

    with CRIClient("/run/containerd/containerd.sock") as cri:
        pod = cri.run_pod("web", runtime_handler="ember")
        cid = cri.create_container(pod, "app", "localhost/busybox:1", ["sleep", "60"])
        cri.runtime.StartContainer(api.StartContainerRequest(container_id=cid))
        print(cri.exec_sync(cid, ["uname", "-r"]).stdout)
        cri.remove_pod(pod)
"""

from __future__ import annotations

import uuid

import grpc

from ember.cri import api_pb2 as api
from ember.cri import api_pb2_grpc as rpc


class CRIClient:
    def __init__(self, socket_path: str, timeout: float = 240.0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.runtime = rpc.RuntimeServiceStub(self.channel)
        self.images = rpc.ImageServiceStub(self.channel)
        self.timeout = timeout
        self._pod_configs: dict[str, api.PodSandboxConfig] = {}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CRIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self) -> api.VersionResponse:
        return self.runtime.Version(api.VersionRequest(version="v1"), timeout=self.timeout)

    def pod_config(self, name: str, *, namespace: str = "default", cgroup_parent: str = "",
                   memory_bytes: int = 0, cpu_quota: int = 0, cpu_period: int = 0,
                   annotations: dict[str, str] | None = None) -> api.PodSandboxConfig:
        linux = api.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent)
        if memory_bytes or cpu_quota:
            linux.resources.CopyFrom(api.LinuxContainerResources(
                memory_limit_in_bytes=memory_bytes, cpu_quota=cpu_quota, cpu_period=cpu_period))
        return api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, namespace=namespace,
                                            uid=str(uuid.uuid4()), attempt=0),
            hostname=name, log_directory="", annotations=annotations or {}, linux=linux)

    def run_pod(self, name: str, runtime_handler: str = "", **kw) -> str:
        config = self.pod_config(name, **kw)
        resp = self.runtime.RunPodSandbox(
            api.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler),
            timeout=self.timeout)
        self._pod_configs[resp.pod_sandbox_id] = config
        return resp.pod_sandbox_id

    def create_container(self, pod_id: str, name: str, image: str, command: list[str],
                         env: dict[str, str] | None = None) -> str:
        config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name, attempt=0),
            image=api.ImageSpec(image=image), command=command,
            envs=[api.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            linux=api.LinuxContainerConfig())
        resp = self.runtime.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=self._pod_configs[pod_id]),
            timeout=self.timeout)
        return resp.container_id

    def start_container(self, container_id: str) -> None:
        self.runtime.StartContainer(api.StartContainerRequest(container_id=container_id),
                                    timeout=self.timeout)

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 60
                  ) -> api.ExecSyncResponse:
        return self.runtime.ExecSync(api.ExecSyncRequest(container_id=container_id, cmd=cmd,
                                                         timeout=timeout),
                                     timeout=self.timeout)

    def container_status(self, container_id: str) -> api.ContainerStatus:
        return self.runtime.ContainerStatus(
            api.ContainerStatusRequest(container_id=container_id), timeout=self.timeout).status

    def pod_status(self, pod_id: str) -> api.PodSandboxStatus:
        return self.runtime.PodSandboxStatus(
            api.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=self.timeout).status

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                    timeout=self.timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                      timeout=self.timeout)
        self._pod_configs.pop(pod_id, None)
