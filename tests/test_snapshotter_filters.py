"""containerd filter syntax for the snapshotter's List (no root needed)."""

from __future__ import annotations

import pytest

from ember.snapshotter.filters import FilterError, fields_of, parse

SNAP = fields_of("sha256:abc", "sha256:def", "committed",
                 {"containerd.io/gc.root": "2026", "team": "a,b"})


@pytest.mark.parametrize("filters, expected", [
    ([], True),
    ([""], True),
    (["name==sha256:abc"], True),
    (["name!=sha256:abc"], False),
    (["kind==committed,parent==sha256:def"], True),
    (["kind==committed,parent==other"], False),
    (['labels."containerd.io/gc.root"'], True),
    (["labels.missing"], False),
    (['labels.team=="a,b"'], True),
    (["name~=^sha256:a"], True),
    (["name~=^sha256:z", "kind==committed"], True),
    (["name~=^sha256:z", "kind==active"], False),
])
def test_matches_like_containerd(filters, expected):
    assert parse(filters)(SNAP) is expected


@pytest.mark.parametrize("bad", ["name==", "==x", "name==a==b", 'labels."open', "name~=(("])
def test_bad_filters_are_refused_with_the_filter_in_the_message(bad):
    with pytest.raises(FilterError) as exc:
        parse([bad])
    assert repr(bad) in str(exc.value)
