"""Pod networking: the pod's CNI-made eth0 joined to the VM's NIC with tc redirect."""
