"""vmm.faults: KVM's page faults counted per thread through tracefs, on this host's real kernel.

The guest is memtouch (ring 3): one write and one read per 4 KiB page of RAM above its image,
per pass, with pass marks on port 0x500 that PassMarker turns into per-pass counts. Tests
that need the kernel's tracepoints skip naming what is missing (no tracefs, no permission,
no kvm events); the ones about refusing a host without them need no KVM at all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmm.config import MachineConfig
from vmm.faults import (
    INSTANCE_PREFIX,
    FaultCounter,
    FaultCountingUnavailable,
    PassMarker,
    fault_counting_available,
    find_tracefs,
    sweep_stale,
)
from vmm.machine import Machine

ROOT = Path(__file__).resolve().parent.parent
MEMTOUCH = str(ROOT / "guests" / "memtouch64.elf")
PAGES_RE = re.compile(rb"memtouch: (\d+) pages x (\d+) passes")


@pytest.fixture(scope="module")
def tracefs() -> Path:
    """The tracefs root, or a skip that names what is missing."""
    ok, why = fault_counting_available()
    if not ok:
        pytest.skip(f"cannot count KVM page faults here: {why}")
    path, _ = find_tracefs()
    assert path is not None
    return path


def huge_pages_always() -> bool:
    """THP in "always" mode turns plain anonymous memory into 2 MiB pages too."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def our_instances(tracefs: Path) -> list[str]:
    return sorted(p.name for p in (tracefs / "instances").glob(f"{INSTANCE_PREFIX}{os.getpid()}-*"))


def run_memtouch(mem: str, passes: int, prefault: str = "none") -> tuple[int, dict[int, dict[str, int]], FaultCounter]:
    """memtouch on KVM with a thread counter joined by its vCPU at the first mark:
    (pages touched per pass, counts per pass, the counter)."""
    config = MachineConfig.parse(
        image=MEMTOUCH, mem=mem, args={"passes": str(passes)}, memory="anon", backend="kvm", prefault=prefault
    )
    with FaultCounter() as counter:
        machine = Machine(config)
        machine.marker = marker = PassMarker(counter)
        result = machine.run(timeout=120)
    assert result.status == 1, result.reason
    found = PAGES_RE.search(result.console)
    assert found, result.console
    return int(found[1]), marker.passes(), counter


# --- a host that cannot count says why -------------------------------------------------------
def test_a_directory_that_is_not_tracefs_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(FaultCountingUnavailable, match="is not a tracefs mount"):
        FaultCounter(tracefs=tmp_path).start()


def test_a_tracefs_without_kvm_events_is_refused_naming_them(tmp_path: Path) -> None:
    (tmp_path / "instances").mkdir()
    (tmp_path / "events" / "sched" / "sched_switch").mkdir(parents=True)
    with pytest.raises(FaultCountingUnavailable, match=r"no kvm/kvm_page_fault or kvmmmu/kvm_mmu_spte_requested"):
        FaultCounter(tracefs=tmp_path).start()


def test_tids_and_a_pid_together_are_refused() -> None:
    with pytest.raises(ValueError, match="tids or pid"):
        FaultCounter(tids=[1], pid=1)


# --- the real kernel ---------------------------------------------------------------------------
@pytest.mark.kvm
def test_first_touch_takes_a_fault_per_page_and_the_second_pass_almost_none(tracefs: Path) -> None:
    pages, passes, counter = run_memtouch("32M", passes=2)
    first, second = passes[0]["faults"], passes[1]["faults"]
    # One per 4 KiB page, or one per 2 MiB where THP "always" backs anonymous memory.
    expected = pages // 512 if huge_pages_always() else pages
    assert first >= 0.9 * expected, (pages, passes)
    assert second <= max(8, first // 100), (pages, passes)
    assert counter.lost == 0
    assert our_instances(tracefs) == []


@pytest.mark.kvm
def test_the_whole_run_counted_by_process_includes_the_first_pass(tracefs: Path) -> None:
    config = MachineConfig.parse(image=MEMTOUCH, mem="16M", args={"passes": "1"}, memory="anon", backend="kvm")
    with FaultCounter(pid=os.getpid()) as counter:
        result = Machine(config).run(timeout=120)
    assert result.status == 1, result.reason
    found = PAGES_RE.search(result.console)
    assert found
    pages = int(found[1])
    expected = pages // 512 if huge_pages_always() else pages
    (key,) = counter.counts
    assert key == os.getpid()
    assert counter.counts[key]["faults"] >= 0.9 * expected
    assert our_instances(tracefs) == []


CHILD = textwrap.dedent(
    """
    import json, os, re, sys
    from vmm.config import MachineConfig
    from vmm.faults import FaultCounter
    from vmm.machine import Machine
    config = MachineConfig.parse(image=sys.argv[1], mem=sys.argv[2], args={"passes": "1"}, memory="anon", backend="kvm")
    with FaultCounter(pid=os.getpid()) as counter:
        print("ready", flush=True)
        sys.stdin.readline()
        result = Machine(config).run(timeout=120)
    pages = int(re.search(rb"memtouch: (\\d+) pages", result.console)[1])
    print(json.dumps({"status": result.status, "pages": pages, "faults": counter.total()["faults"]}))
    """
)


@pytest.mark.kvm
def test_two_counters_in_two_processes_do_not_see_each_others_faults(tracefs: Path) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, MEMTOUCH, mem],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for mem in ("16M", "96M")
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:  # both count before either runs: their runs overlap
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        reports = [json.loads(child.communicate(timeout=180)[0]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    small, large = reports
    assert small["status"] == large["status"] == 1
    per_page = 512 if huge_pages_always() else 1
    for report in reports:
        assert 0.9 * report["pages"] // per_page <= report["faults"] <= 1.1 * report["pages"] // per_page + 64, reports
    assert small["faults"] < large["pages"] // per_page // 2, reports


@pytest.mark.kvm
def test_the_instances_are_removed_when_the_counted_code_raises(tracefs: Path) -> None:
    with pytest.raises(RuntimeError, match="inside"), FaultCounter(tids=[os.getpid()]):
        assert len(our_instances(tracefs)) >= 1
        raise RuntimeError("inside")
    assert our_instances(tracefs) == []


@pytest.mark.kvm
def test_instances_a_killed_process_left_behind_are_swept(tracefs: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tracefs / "instances" / f"{INSTANCE_PREFIX}{pid}-0-{pid}-kvm_page_fault"
    stale.mkdir()
    try:
        assert stale.name in sweep_stale(tracefs)
        assert not stale.exists()
    finally:
        if stale.exists():
            stale.rmdir()
