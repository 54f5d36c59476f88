"""JSON types of the AdmissionReview and Pod fields the webhook reads.

The API server only sends well-typed pods, but anyone who can reach the
webhook's port can send anything. Checking the types of exactly the fields
``detect`` and ``decide`` read turns a hostile body into an HTTP 400 with
the field's name, instead of an exception deep in the decision. Fields the
webhook never reads are not checked (the API server validates pods itself).
"""

from __future__ import annotations

from ember.image.schema import anything, array, boolean, mapping, nullable, obj, string


def _opt(check):  # type: ignore[no-untyped-def]
    return nullable(check), False


_PROFILE = obj({"type": _opt(string)})
_NAMED = obj({"name": _opt(string)})

_SECURITY = obj({
    "privileged": _opt(boolean),
    "capabilities": _opt(obj({"add": _opt(array(anything))})),
    "readOnlyRootFilesystem": _opt(boolean),
    "seccompProfile": _opt(_PROFILE),
    "appArmorProfile": _opt(_PROFILE),
    "sysctls": _opt(array(_NAMED)),
})

CONTAINER = obj({
    "name": _opt(string),
    "restartPolicy": _opt(string),
    "securityContext": _opt(_SECURITY),
    "resources": _opt(obj({"limits": _opt(mapping(anything)),
                           "requests": _opt(mapping(anything))})),
    "resizePolicy": _opt(array(obj({"restartPolicy": _opt(string)}))),
    "volumeDevices": _opt(array(_NAMED)),
})

VOLUME = obj({
    "name": _opt(string),
    "emptyDir": _opt(obj({"medium": _opt(string)})),
    "hostPath": _opt(obj({"path": _opt(string)})),
})

POD = obj({
    "apiVersion": _opt(string),
    "kind": _opt(string),
    "metadata": _opt(obj({
        "name": _opt(string),
        "generateName": _opt(string),
        "namespace": _opt(string),
        "annotations": _opt(mapping(string)),
        "labels": _opt(mapping(string)),
    })),
    "spec": _opt(obj({
        "runtimeClassName": _opt(string),
        "hostNetwork": _opt(boolean),
        "hostPID": _opt(boolean),
        "hostIPC": _opt(boolean),
        "shareProcessNamespace": _opt(boolean),
        "containers": _opt(array(CONTAINER)),
        "initContainers": _opt(array(CONTAINER)),
        "ephemeralContainers": _opt(array(CONTAINER)),
        "volumes": _opt(array(VOLUME)),
        "securityContext": _opt(_SECURITY),
    })),
})

REQUEST = obj({
    "uid": (string, True),
    "kind": _opt(obj({"group": _opt(string), "version": _opt(string), "kind": _opt(string)})),
    "operation": _opt(string),
    "namespace": _opt(string),
    "name": _opt(string),
    "subResource": _opt(string),
})
