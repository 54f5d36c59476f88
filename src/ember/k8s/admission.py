"""AdmissionReview in, AdmissionReview out: the wire format of the webhook.

Two kinds of bad input are told apart. A body that is not an AdmissionReview
at all (not JSON, nested too deeply, wrong kind or version, no uid, or a pod
whose fields the decision reads have the wrong JSON types) cannot be answered
in the API's own terms, so it raises :class:`BadRequest` and the server
replies HTTP 400. A well-formed review about something that is not a pod is
answered with ``allowed: false`` and a message, which the API server shows
the user.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass

from ember.image import schema
from ember.k8s import podschema
from ember.k8s.decide import ADMISSION_ANNOTATION, Decision, decide, decide_ephemeral
from ember.k8s.policy import Policy
from ember.util import as_dict

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
EPHEMERAL = "ephemeralcontainers"  # the pods/ephemeralcontainers subresource


class BadRequest(Exception):
    """The body is not an AdmissionReview; the message says what is wrong."""


@dataclass
class Review:
    api_version: str
    uid: str
    request: dict


def escape_pointer(token: str) -> str:
    """Escape one JSON Pointer reference token (RFC 6901: ~ first, then /)."""
    return token.replace("~", "~0").replace("/", "~1")


def parse_review(body: bytes) -> Review:
    """Check the envelope; raise BadRequest naming the first thing wrong."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise BadRequest("body is not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("body is not a JSON object")
    if doc.get("kind") != "AdmissionReview":
        raise BadRequest(f"kind must be AdmissionReview, not {doc.get('kind')!r}")
    if doc.get("apiVersion") not in API_VERSIONS:
        raise BadRequest(f"apiVersion must be one of {', '.join(API_VERSIONS)}, "
                         f"not {doc.get('apiVersion')!r}")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise BadRequest("AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadRequest("AdmissionReview request has no uid")
    _check_types(request)
    return Review(doc["apiVersion"], uid, request)


def _check_types(request: dict) -> None:
    """Refuse a review whose fields (those the decision reads) have the wrong JSON types."""
    schema.validate(request, podschema.REQUEST, "AdmissionReview request", BadRequest)
    if _is_pod_kind(request.get("kind")):
        for key in ("object", "oldObject"):
            if isinstance(request.get(key), dict):
                schema.validate(request[key], podschema.POD, f"AdmissionReview request.{key}",
                                BadRequest)


def _is_pod_kind(kind: object) -> bool:
    return isinstance(kind, dict) and (kind.get("group"), kind.get("version"),
                                       kind.get("kind")) == ("", "v1", "Pod")


def _pod_problem(request: dict) -> str | None:
    kind = request.get("kind")
    if not _is_pod_kind(kind):
        return f"ember webhook only admits core/v1 Pods, not {json.dumps(kind)}"
    if request.get("subResource") not in (None, "", EPHEMERAL):
        return f"ember webhook does not handle the {request['subResource']} subresource"
    obj = request.get("object")
    if not isinstance(obj, dict):
        return "AdmissionReview request has no object"
    if obj.get("kind", "Pod") != "Pod" or obj.get("apiVersion", "v1") != "v1":
        return f"request.object is a {obj.get('apiVersion')}/{obj.get('kind')}, not a v1 Pod"
    if not isinstance(obj.get("spec"), dict) or not isinstance(obj["spec"].get("containers"),
                                                                 list):
        return "request.object is not a pod: it has no spec.containers"
    return None


def class_patch(pod: dict, decision: Decision) -> list[dict]:
    """RFC 6902 operations that give the pod its class and record why."""
    ops: list[dict] = []
    spec = pod["spec"]
    op = "replace" if "runtimeClassName" in spec else "add"
    ops.append({"op": op, "path": "/spec/runtimeClassName", "value": decision.runtime_class})
    note = f"{decision.runtime_class}: {decision.why}"
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        ops.append({"op": "add", "path": "/metadata",
                    "value": {"annotations": {ADMISSION_ANNOTATION: note}}})
    elif not isinstance(meta.get("annotations"), dict):
        ops.append({"op": "add", "path": "/metadata/annotations",
                    "value": {ADMISSION_ANNOTATION: note}})
    else:
        op = "replace" if ADMISSION_ANNOTATION in meta["annotations"] else "add"
        ops.append({"op": op, "path": "/metadata/annotations/" + escape_pointer(
            ADMISSION_ANNOTATION), "value": note})
    return ops


def respond(review: Review, allowed: bool, *, message: str = "", code: int = 0,
            patch: list[dict] | None = None, warnings: list[str] | None = None) -> dict:
    """An AdmissionReview response in the request's own apiVersion."""
    response: dict = {"uid": review.uid, "allowed": allowed}
    if not allowed or message:
        response["status"] = {"code": code or (200 if allowed else 403),
                              "message": message}
        if not allowed:
            response["status"]["reason"] = "BadRequest" if code == 400 else "Forbidden"
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warnings:
        response["warnings"] = warnings
    return {"apiVersion": review.api_version, "kind": "AdmissionReview", "response": response}


def review_pod(review: Review, labels_of: Callable[[str], dict[str, str]], policy: Policy,
               mutate: bool) -> tuple[dict, Decision | None]:
    """Answer a parsed review; the Decision is returned for metrics and logs.

    ``labels_of(namespace)`` is only called when the answer depends on it, so
    excluded namespaces and malformed reviews cost no API request.
    """
    problem = _pod_problem(review.request)
    if problem:
        return respond(review, False, message=problem, code=400), None
    if review.request.get("subResource") == EPHEMERAL:
        return _review_ephemeral(review, policy)
    if review.request.get("operation", "CREATE") != "CREATE":
        # runtimeClassName is immutable once the pod exists: nothing to decide.
        return respond(review, True), Decision(True, "unchanged", why="not a CREATE")
    pod = review.request["object"]
    namespace = _namespace(review.request, pod)
    ns_labels = {} if namespace in policy.exclude_namespaces else labels_of(namespace)
    decision = decide(pod, namespace, ns_labels, policy)
    if not decision.allowed:
        return respond(review, False, message=decision.message, code=403), decision
    patch = class_patch(pod, decision) if mutate and decision.set_class else None
    warnings = list(decision.warnings)
    if not mutate and decision.set_class:
        warnings.insert(0, f"ember: the mutating webhook would set runtimeClassName "
                           f"{decision.runtime_class} ({decision.why})")
    return respond(review, True, patch=patch, warnings=warnings), decision


def _namespace(request: dict, pod: dict) -> str:
    meta = as_dict(pod.get("metadata"))
    return str(request.get("namespace") or meta.get("namespace") or "default")


def _review_ephemeral(review: Review, policy: Policy) -> tuple[dict, Decision]:
    """Ephemeral containers (``kubectl debug``) added to a running pod: checked, never patched."""
    pod = review.request["object"]
    decision = decide_ephemeral(pod, review.request.get("oldObject"),
                                _namespace(review.request, pod), policy)
    if not decision.allowed:
        return respond(review, False, message=decision.message, code=403), decision
    return respond(review, True, warnings=list(decision.warnings)), decision
