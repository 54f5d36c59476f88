"""Idle sandboxes hold less host memory (issue 14, point 4).

* The jailed QEMU runs without transparent huge pages (inherited through the
  jailer), so a restored guest's scattered pages do not each cost 2 MiB.
* The guest zeroes pages it frees (init_on_free), so they travel in the
  template snapshot as zero pages and a restore never makes them resident.
* The TCG translation cache is capped (tb-size) at the configured size
  (``[vm] tcg_tb_size_mib``, default 32 MiB).
"""

from __future__ import annotations

import json

import pytest
from test_jailer_support import status

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(600)]


def test_idle_vmm_has_no_huge_pages_and_a_capped_translation_cache(ember_env, image):
    sid = ember_env.run("run", "-d", image, "sleep", "300", check=True).stdout.decode().strip()
    info = json.loads(ember_env.run("inspect", sid, check=True).stdout)[0]
    pid = info["vmm_pid"]
    tb_mib = ember_env.cfg().vm.tcg_tb_size_mib
    assert info["jail"], "the VMM runs jailed"
    assert status(pid)["THP_enabled"] == "0"
    with open(f"/proc/{pid}/smaps_rollup") as f:
        huge = [int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")]
    assert huge == [0]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert f"tcg,tb-size={tb_mib}".encode() in argv
    # The largest executable anonymous mapping is the translation cache.
    sizes = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 2 and head[1] == "rwxp" and len(head) == 5:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                sizes.append(hi - lo)
    assert sizes and max(sizes) <= (tb_mib << 20) + (1 << 20)
    proc = ember_env.run("exec", sid, "cat", "/proc/cmdline", check=True)
    assert "init_on_free=1" in proc.stdout.decode().split()
    ember_env.run("rm", "-f", sid, check=True)
