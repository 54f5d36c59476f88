"""Check Firecracker API requests against its published OpenAPI description.

The description (swagger 2.0, ``firecracker-v<version>.yaml``) is the contract
the driver must meet on machines where no Firecracker binary can run. This
module turns it into a request checker: the path must match one of its path
templates, the method must be one the template offers, a required body must
be there, and the body must satisfy the operation's schema — required fields,
types, enums, minimum/maximum — checked by ``jsonschema`` (swagger 2.0
schemas are JSON Schema draft 4 with a few extra keywords that validators
ignore). One rule is Firecracker's rather than the document's: its request
structs reject unknown fields, so object schemas that do not declare
``additionalProperties`` are closed here.

Error texts follow Firecracker's own wording where it has one, because the
fake server built on this returns them as ``fault_message``.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

SPEC_NAME = "firecracker-v1.16.1.yaml"


def default_spec_path() -> Path:
    """``$EMBER_FC_SPEC``, else the project's shared specs folder beside the repo."""
    env = os.environ.get("EMBER_FC_SPEC")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[4]
    return repo.parent / "shared" / "specs" / SPEC_NAME


class ContractError(ValueError):
    """A request the published description does not allow."""


@dataclass(frozen=True)
class Operation:
    method: str
    template: str  # e.g. "/drives/{drive_id}"
    operation_id: str
    params: dict[str, str]  # path parameters


def _close_objects(node: object) -> None:
    """Firecracker's serde structs deny unknown fields: close open object schemas."""
    if isinstance(node, dict):
        if (node.get("type") == "object" and "properties" in node
                and "additionalProperties" not in node):
            node["additionalProperties"] = False
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_objects(value)


class Contract:
    """The API description of one Firecracker version, ready to check requests."""

    def __init__(self, spec_path: Path | str | None = None) -> None:
        path = Path(spec_path) if spec_path else default_spec_path()
        try:
            self.doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise FileNotFoundError(f"Firecracker API description not found: {path} "
                                    f"({exc.strerror}); set EMBER_FC_SPEC") from None
        if self.doc.get("swagger") != "2.0":
            raise ValueError(f"{path}: not a swagger 2.0 document")
        self.version = str(self.doc["info"]["version"])
        self.definitions = copy.deepcopy(self.doc.get("definitions", {}))
        _close_objects(self.definitions)
        self._routes: list[tuple[re.Pattern[str], str, dict]] = []
        for template, item in self.doc["paths"].items():
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            self._routes.append((re.compile(f"^{pattern}$"), template, item))

    # ------------------------------------------------------------ requests
    def route(self, method: str, path: str) -> tuple[Operation, dict]:
        """The operation a method and path name, or ContractError."""
        bare = path.split("?", 1)[0]
        for pattern, template, item in self._routes:
            m = pattern.match(bare)
            if m and method.lower() in item:
                op = item[method.lower()]
                return Operation(method.upper(), template, op.get("operationId", ""),
                                 m.groupdict()), op
        raise ContractError(f"Invalid request method and/or path: {method} {bare}.")

    def check(self, method: str, path: str, body: object = None,
              has_body: bool | None = None) -> Operation:
        """Check one request; returns its operation. ``body`` is the decoded JSON."""
        operation, op = self.route(method, path)
        has_body = body is not None if has_body is None else has_body
        for param in op.get("parameters", []):
            if param.get("in") == "body":
                if not has_body:
                    if param.get("required"):
                        raise ContractError(f"Empty {operation.method} request.")
                    continue
                self.check_schema(param["schema"], body)
            elif param.get("in") == "path" and param.get("required"):
                if not operation.params.get(param["name"]):
                    raise ContractError(f"Missing path parameter {param['name']}.")
        return operation

    def check_schema(self, schema: dict, value: object) -> None:
        """Validate ``value`` against a schema of the description (refs allowed)."""
        root = {**copy.deepcopy(schema), "definitions": self.definitions}
        validator = jsonschema.Draft4Validator(root)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path)
            raise ContractError("An error occurred when deserializing the json body of a "
                                f"request: {where + ': ' if where else ''}{error.message}")

    # ----------------------------------------------------------- responses
    def check_response(self, operation: Operation, status: int, body: object) -> None:
        """Check an answer against the operation's documented responses."""
        op = self.doc["paths"][operation.template][operation.method.lower()]
        responses = op.get("responses", {})
        spec = responses.get(status) or responses.get(str(status)) or responses.get("default")
        if spec is None:
            raise ContractError(f"{operation.method} {operation.template}: status {status} "
                                "is not documented")
        schema = spec.get("schema")
        if schema is None:
            if body not in (None, b"", ""):
                raise ContractError(f"{operation.method} {operation.template}: status {status} "
                                    "must have no body")
            return
        self.check_schema(schema, body)


@lru_cache(maxsize=4)
def load(spec_path: str | None = None) -> Contract:
    """A cached Contract (parsing the YAML takes a moment)."""
    return Contract(spec_path)
