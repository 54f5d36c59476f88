"""The QEMU machine: no PIT exactly when the guest is told its TSC rate."""

from __future__ import annotations

from ember.vmm.qemu.machine import MACHINE, machine


def test_a_guest_told_its_tsc_rate_gets_no_pit():
    assert machine("console=ttyS0 tsc_early_khz=2445430 quiet") == MACHINE + ",pit=off"


def test_a_guest_that_must_calibrate_its_tsc_keeps_the_pit():
    assert machine("console=ttyS0 quiet") == MACHINE
    assert "pit=off" not in machine("console=ttyS0 my_tsc_early_khz=1")

