"""Type checks for image metadata, after the OCI image spec (manifest, index, config).

(The combinators are generic; ember.k8s.podschema uses them for admission reviews.)

Manifests, indexes and configs come from registries and archives we do not
trust. Every field Ember (or a later reader of the store) looks at is checked
for its JSON type here, before anything is staged for commit, so a hostile
document fails with one line naming the field instead of a traceback later,
possibly in another user's ``ember images``. Fields the spec allows but Ember
never reads are not checked; unknown fields are ignored, as the spec says.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ember.errors import ImageError

Check = Callable[[object, str], None]

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_MAX_SIZE = (1 << 63) - 1  # int64, as the spec types descriptor sizes


class _Invalid(Exception):
    """A field has the wrong type; caught by :func:`validate` and made one line."""

    def __init__(self, path: str, expected: str, value: object) -> None:
        super().__init__(path, expected, value)
        self.path, self.expected, self.value = path, expected, value


_MISSING = object()


def _kind(value: object) -> str:
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def string(value: object, path: str) -> None:
    if not isinstance(value, str):
        raise _Invalid(path, "a string", value)


def boolean(value: object, path: str) -> None:
    if not isinstance(value, bool):
        raise _Invalid(path, "a boolean", value)


def size(value: object, path: str) -> None:
    """A byte count: an int64 >= 0 (JSON true, 1.5 or "12" are not sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_SIZE:
        raise _Invalid(path, "a non-negative integer", value)


def digest(value: object, path: str) -> None:
    """Digests name files in the store, so only sha256 passes."""
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        raise _Invalid(path, "a sha256 digest", value)


def schema_version_2(value: object, path: str) -> None:
    if value == 1 and not isinstance(value, bool):
        raise ImageError(f"{path}: Docker schema 1 manifests are not supported")
    if isinstance(value, bool) or value != 2:
        raise _Invalid(path, "2", value)


def anything(value: object, path: str) -> None:
    """A field whose content Ember never reads."""


def nullable(check: Check) -> Check:
    """Docker writes null for absent fields; readers treat null as absent."""

    def run(value: object, path: str) -> None:
        if value is not None:
            check(value, path)

    return run


def either(*checks: Check, expected: str) -> Check:
    def run(value: object, path: str) -> None:
        for check in checks:
            try:
                check(value, path)
                return
            except _Invalid:
                continue
        raise _Invalid(path, expected, value)

    return run


def array(item: Check) -> Check:
    def run(value: object, path: str) -> None:
        if not isinstance(value, list):
            raise _Invalid(path, "an array", value)
        for i, element in enumerate(value):
            item(element, f"{path}[{i}]")

    return run


def mapping(item: Check) -> Check:
    """A JSON object used as a map (annotations, labels): string keys, typed values."""

    def run(value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(path, "an object", value)
        for key, element in value.items():
            item(element, f"{path}.{key}")

    return run


def obj(fields: dict[str, tuple[Check, bool]]) -> Check:
    """A JSON object with known fields: (check, required) each; others are ignored."""

    def run(value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(path, "an object", value)
        for name, (check, required) in fields.items():
            where = f"{path}.{name}" if path else name
            if name in value:
                check(value[name], where)
            elif required:
                raise _Invalid(where, "present", _MISSING)

    return run


def _opt(check: Check) -> tuple[Check, bool]:
    return check, False


def _req(check: Check) -> tuple[Check, bool]:
    return check, True


PLATFORM = obj({
    "architecture": _req(string),
    "os": _req(string),
    "os.version": _opt(string),
    "os.features": _opt(array(string)),
    "variant": _opt(string),
    "features": _opt(array(string)),
})

DESCRIPTOR = obj({
    "mediaType": _opt(string),
    "digest": _req(digest),
    "size": _req(size),
    "urls": _opt(array(string)),
    "annotations": _opt(mapping(string)),
    "platform": _opt(PLATFORM),
    "data": _opt(string),
    "artifactType": _opt(string),
})

MANIFEST = obj({
    "schemaVersion": _req(schema_version_2),
    "mediaType": _opt(string),
    "artifactType": _opt(string),
    "config": _req(DESCRIPTOR),
    "layers": _req(array(DESCRIPTOR)),
    "subject": _opt(DESCRIPTOR),
    "annotations": _opt(mapping(string)),
})

INDEX = obj({
    "schemaVersion": _req(schema_version_2),
    "mediaType": _opt(string),
    "artifactType": _opt(string),
    "manifests": _req(array(DESCRIPTOR)),
    "subject": _opt(DESCRIPTOR),
    "annotations": _opt(mapping(string)),
})

_STRINGS = nullable(array(string))
_RUN = nullable(obj({
    "User": _opt(nullable(string)),
    "ExposedPorts": _opt(nullable(mapping(anything))),
    "Env": _opt(_STRINGS),
    # Docker accepts a string Entrypoint (run through a shell split); the spec builder does too.
    "Entrypoint": _opt(nullable(either(string, array(string), expected="an array of strings"))),
    "Cmd": _opt(_STRINGS),
    "Volumes": _opt(nullable(mapping(anything))),
    "WorkingDir": _opt(nullable(string)),
    "Labels": _opt(nullable(mapping(string))),
    "StopSignal": _opt(nullable(string)),
    "ArgsEscaped": _opt(nullable(boolean)),
}))

CONFIG = obj({
    "created": _opt(nullable(string)),
    "author": _opt(nullable(string)),
    "architecture": _opt(string),
    "os": _opt(string),
    "os.version": _opt(nullable(string)),
    "os.features": _opt(_STRINGS),
    "variant": _opt(nullable(string)),
    "config": _opt(_RUN),
    "Config": _opt(_RUN),  # some old docker configs spell it so; the spec builder reads both
    "rootfs": _opt(obj({"type": _req(string), "diff_ids": _req(array(digest))})),
    "history": _opt(nullable(array(obj({
        "created": _opt(nullable(string)),
        "author": _opt(nullable(string)),
        "created_by": _opt(nullable(string)),
        "comment": _opt(nullable(string)),
        "empty_layer": _opt(nullable(boolean)),
    })))),
})


# `docker save`'s manifest.json: which files of the archive make up each image.
DOCKER_SAVE = array(obj({
    "Config": _req(string),
    "RepoTags": _opt(nullable(array(string))),
    "Layers": _opt(nullable(array(string))),
}))


def validate(doc: object, check: Check, what: str,
             error: Callable[[str], Exception] = ImageError) -> None:
    """Raise one line, ``error("{what}: field F must be ..., not ...")``, on a type error.

    ``error`` lets other untrusted JSON (the admission webhook's reviews) reuse
    these checks with its own exception.
    """
    try:
        check(doc, "")
    except _Invalid as exc:
        where = f" field {exc.path}" if exc.path else ""
        if exc.value is _MISSING:
            raise error(f"{what}:{where} is missing") from None
        raise error(f"{what}:{where} must be {exc.expected}, not {_kind(exc.value)}") from None
    except ImageError as exc:
        raise error(f"{what}: {exc}") from None
