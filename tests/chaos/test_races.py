"""Concurrent creates and removals with one name (issue 13, point 6).

Three `run -d --name same` at once: exactly one wins, the others fail with one
line and leave nothing. Then two `rm -f same` and two new `run -d --name same`
at once: whatever order they land in, there is never more than one sandbox
named ``same``, every command either succeeds or fails with one clear line,
`ps -a` tells the truth, and once the last one is removed nothing of any of
them is left.
"""

from __future__ import annotations

import time

import pytest

from .conftest import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(600)]


def _finish_all(chaos, procs) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        code = p.wait(300)
        stdout = p.stdout.read().decode().strip()
        out.append((code, stdout, chaos.stderr_of(p)))
    return out


def test_same_name_creates_and_removals(chaos, image):
    creates = [chaos.start("run", "-d", "--name", "same", image, "sleep", "600")
               for _ in range(3)]
    results = _finish_all(chaos, creates)
    winners = [out for code, out, _ in results if code == 0]
    assert len(winners) == 1, results
    for code, _, err in results:
        if code:
            assert code == 125 and err.count("\n") == 1 and "already in use" in err, err
    [entry] = chaos.assert_truthful()
    assert (entry["id"], entry["name"], entry["status"]) == (winners[0], "same", "running")

    racers = [chaos.start("rm", "-f", "same"), chaos.start("rm", "-f", "same")]
    time.sleep(0.3)  # the creates land while the removals run, or just after
    racers += [chaos.start("run", "-d", "--name", "same", image, "sleep", "600")
               for _ in range(2)]
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in racers) and time.monotonic() < deadline:
        same = [p for p in chaos.ps() if p["name"] == "same"]
        assert len(same) <= 1, f"two sandboxes named same: {same}"
        time.sleep(0.2)
    results = _finish_all(chaos, racers)
    for code, _out, err in results[:2]:
        assert code == 0 or ("no such sandbox" in err and err.count("\n") == 1), (code, err)
    created = [out for code, out, _ in results[2:] if code == 0]
    for code, _, err in results[2:]:
        if code:
            assert code == 125 and err.count("\n") == 1, err
    chaos.seen.update(created)
    assert len(created) <= 1, results
    listed = chaos.assert_truthful()
    assert [p["id"] for p in listed if p["name"] == "same"] == created
    for sid in created:
        chaos.finish("same", sid)
    for sid in chaos.seen:
        chaos.assert_clean(sid)
    wait_for("an empty ps -a", lambda: chaos.assert_truthful() == [], 10, 0.2)
