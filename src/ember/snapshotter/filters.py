"""containerd's filter syntax for List, for the fields a snapshot has.

``List`` takes several filters; a snapshot matches if any filter matches. A
filter is comma-separated selectors that must all match; a selector is a field
path alone (present and non-empty) or ``path==value``, ``path!=value`` or
``path~=regexp``. Paths: ``name``, ``parent``, ``kind`` and ``labels.KEY``;
KEY and values may be double-quoted (``labels."containerd.io/gc.root"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|([^,=!~"]+)|(==|!=|~=)|(,)')

Selector = Callable[[dict[str, str]], bool]


class FilterError(ValueError):
    """A filter string containerd's grammar does not accept."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise FilterError(f"invalid filter {text!r} at position {pos}")
        quoted, word, op, comma = m.groups()
        if quoted is not None:
            out.append(("word", bytes(quoted, "utf-8").decode("unicode_escape")))
        elif word is not None:
            out.append(("word", word.strip()))
        elif op:
            out.append(("op", op))
        else:
            out.append(("comma", ","))
        pos = m.end()
    return out


def _selector(tokens: list[tuple[str, str]], text: str) -> Selector:
    # path: word ('.' joined words may come as one word or word "quoted")
    path: list[str] = []
    i = 0
    while i < len(tokens) and tokens[i][0] == "word":
        path.append(tokens[i][1])
        i += 1
    key = "".join(path)
    if not key:
        raise FilterError(f"invalid filter {text!r}: missing field name")
    if i == len(tokens):
        return lambda fields: bool(fields.get(key))
    if tokens[i][0] != "op" or i + 2 != len(tokens) or tokens[i + 1][0] != "word":
        raise FilterError(f"invalid filter {text!r}")
    op, value = tokens[i][1], tokens[i + 1][1]
    if op == "==":
        return lambda fields: fields.get(key) == value
    if op == "!=":
        return lambda fields: fields.get(key) != value
    try:
        rx = re.compile(value)
    except re.error as exc:
        raise FilterError(f"invalid regexp in filter {text!r}: {exc}") from None
    return lambda fields: key in fields and rx.search(fields[key]) is not None


def parse(filters: list[str]) -> Selector:
    """One predicate over a snapshot's flattened fields for all ``filters``."""
    alternatives: list[list[Selector]] = []
    for text in filters:
        if not text.strip():
            continue
        group: list[Selector] = []
        current: list[tuple[str, str]] = []
        for tok in _tokens(text) + [("comma", ",")]:
            if tok[0] == "comma":
                if current:
                    group.append(_selector(current, text))
                current = []
            else:
                current.append(tok)
        alternatives.append(group)
    if not alternatives:
        return lambda fields: True
    return lambda fields: any(all(s(fields) for s in g) for g in alternatives)


def fields_of(name: str, parent: str, kind: str, labels: dict[str, str]) -> dict[str, str]:
    """The flattened view of a snapshot that selectors look at."""
    out = {"name": name, "parent": parent, "kind": kind}
    out.update({f"labels.{k}": v for k, v in labels.items()})
    return out
