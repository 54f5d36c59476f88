"""Reference parsing: what users type must map to one canonical name, or fail clearly."""

from __future__ import annotations

import pytest

from ember.errors import ImageError
from ember.image.reference import familiar_name, normalize, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
        ("user/app:v2", "docker.io/user/app:v2"),
        ("localhost:5000/x/y:tag", "localhost:5000/x/y:tag"),
        ("localhost/demo:1", "localhost/demo:1"),
        ("localhost/demo", "localhost/demo:latest"),
        ("quay.io/org/some-app_x.y:v1.2-rc", "quay.io/org/some-app_x.y:v1.2-rc"),
        ("127.0.0.1:5000/app", "127.0.0.1:5000/app:latest"),
        (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
        (f"localhost:5000/a:t@{DIGEST}", f"localhost:5000/a:t@{DIGEST}"),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_parts() -> None:
    ref = parse_reference("localhost:5000/x/y:tag")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "localhost:5000",
        "x/y",
        "tag",
        None,
    )
    assert ref.name == "localhost:5000/x/y"
    by_digest = parse_reference(f"busybox@{DIGEST}")
    assert by_digest.tag is None and by_digest.digest == DIGEST


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Busybox",
        "busybox:",
        "busybox:bad tag",
        "busy box",
        "busybox@sha256:1234",
        "busybox@md5:" + "a" * 32,
        "-busybox",
        "localhost:5000/",
        "a//b",
        "x:" + "t" * 200,
        "UPPER.example.com:bad/x",
        "a/" + "b" * 300,
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(ImageError, match="^invalid reference format: "):
        parse_reference(text)


def test_familiar() -> None:
    assert familiar_name("docker.io/library/busybox:latest") == "busybox:latest"
    assert familiar_name("docker.io/user/app:v2") == "user/app:v2"
    assert familiar_name("localhost/demo:1") == "localhost/demo:1"
