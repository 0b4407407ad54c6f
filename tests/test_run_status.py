"""How a run ends → its status and reason: vmm.result.run_status, a pure function, tested
without a VM (as Firecracker tests its exit handling)."""

from __future__ import annotations

import pytest

from vmm.result import Crash, run_status

TRIPLE = Crash(1, "triple fault (shutdown)", 0x1234, triple_fault=True)
CALM = {"interrupted": False, "timed_out": False, "idle": False, "timeout": 5.0}


@pytest.mark.parametrize(
    ("end", "flags", "status", "reason"),
    [
        (("exit", 0), {}, 1, "guest exited with value 0"),
        (("exit", 0x7F), {}, 0xFF, "guest exited with value 127"),
        (("exit", 0x80), {}, 1, "guest exited with value 128"),  # (v << 1) | 1, an 8-bit status
        (("crash", TRIPLE), {}, 4, "guest crashed: vCPU 1: triple fault (shutdown) at rip 0x1234"),
        (("reset", "i8042"), {}, 0, "guest reset the machine (i8042)"),
        (("gdb-kill", None), {}, 0, "killed from gdb"),
        (("quit", "Ctrl-A x"), {}, 130, "stopped from the console (Ctrl-A x)"),
        (("broken-pipe", None), {}, 141, "stopped: the console's reader went away (broken pipe)"),
        (None, {"interrupted": True}, 130, "interrupted"),
        (None, {"timed_out": True}, 124, "timeout after 5 s"),
        (None, {"timed_out": True, "idle": True}, 0, "all vCPUs halted"),  # halted before the clock ran out
        (None, {}, 0, "all vCPUs halted"),
        # The guest's own word wins over what happened to the host afterwards.
        (("exit", 3), {"interrupted": True, "timed_out": True}, 7, "guest exited with value 3"),
        (("crash", TRIPLE), {"timed_out": True}, 4, "guest crashed: vCPU 1: triple fault (shutdown) at rip 0x1234"),
    ],
)
def test_run_status(end, flags, status, reason):
    assert run_status(end, **{**CALM, **flags}) == (status, reason)
