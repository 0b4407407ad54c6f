"""The one entry point (``prefault_vm`` / ``prefault_backend``): each strategy does what it
says, the report tells what happened with measured residency, explicit kernel strategies
are errors where the kernel lacks them, and the RFC probe reads this kernel right."""

from __future__ import annotations

import errno
import io
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from kvm_abi import Cap
from vmm.config import MachineConfig
from vmm.cpu.layout import BootLayout
from vmm.errors import InputError, Unavailable
from vmm.machine import Machine
from vmm.memory import GuestMemory, GuestRegion, HostMemory
from vmm.prefault import (
    EmulatedPrefault,
    HelperVcpus,
    PrefaultError,
    kernel,
    map_memory,
    prefault_backend,
    prefault_memory,
    prefault_vm,
)
from vmm.prefault import host as host_mod
from vmm.prefault import progress as progress_mod
from vmm.prefault.contract import drive_map_memory

MiB = 1 << 20
PAGE = 4096
GUESTS = Path(__file__).resolve().parent.parent / "guests"


def has_cap(kvm: Any, cap: Cap) -> bool:
    return bool(kvm.check_extension(cap))


@pytest.fixture
def vm64(kvm):
    """A VM with 64 MiB of fresh THP memory at 0 and 16 MiB of anonymous memory at 1 GiB."""
    with kvm.create_vm() as vm:
        vm.add_memory(0, 64 * MiB, "thp")
        vm.add_memory(1 << 30, 16 * MiB, "anon")
        yield vm


class MemoryOnlyBackend:
    """A backend without KVM, as the emulator is: it has guest memory and a name only."""

    name = "emulator"

    def __init__(self, size: int) -> None:
        self.memory = GuestMemory()
        self.memory.add(GuestRegion(0, size, HostMemory.allocate(size, "anon")))

    def close(self) -> None:
        for r in self.memory:
            self.memory.remove(r)
            r.host.close()


# --- strategies on a KVM VM ------------------------------------------------------------
@pytest.mark.kvm
@pytest.mark.parametrize("strategy", ["host", "emulated", "auto"])
def test_populating_strategies_leave_everything_resident(vm64, strategy):
    total = 80 * MiB
    assert vm64.memory.resident_bytes() == 0
    report = prefault_vm(vm64, strategy=strategy, threads=2)
    assert report.requested == strategy
    assert report.bytes_requested == report.bytes_done == total
    assert report.resident_before == 0
    assert report.resident_bytes == vm64.memory.resident_bytes() == total
    assert report.seconds > 0 and report.gib_per_s is not None and report.gib_per_s > 0
    assert report.threads == 2
    assert report.backing == "anon,thp"


@pytest.mark.kvm
def test_none_populates_nothing(vm64):
    report = prefault_vm(vm64, strategy="none")
    assert (report.strategy, report.bytes_done, report.resident_bytes, report.steps) == ("none", 0, 0, ())
    assert vm64.memory.resident_bytes() == 0


@pytest.mark.lab
@pytest.mark.kvm
def test_auto_says_which_way_it_went_and_why(kvm, vm64):
    report = prefault_vm(vm64, [(0, 8 * MiB)], strategy="auto")
    if has_cap(kvm, Cap.PRE_FAULT_MEMORY):
        assert report.strategy in ("host+kernel", "host+map-memory")
        assert report.steps[0].name == "host"
        assert not report.fell_back
    else:
        assert report.strategy == "emulated" and report.fell_back
        assert "KVM_CAP_PRE_FAULT_MEMORY is 0" in report.reason and "fell back" in report.reason
        assert any("stage-2" in limit for limit in report.limits)
        # Only the asked range: the rest of the VM's RAM is untouched.
        assert report.resident_bytes == 8 * MiB == vm64.memory.resident_bytes()


@pytest.mark.lab
@pytest.mark.kvm
@pytest.mark.parametrize(("strategy", "capability"), [("kernel", "PRE_FAULT_MEMORY"), ("map-memory", "MAP_MEMORY")])
def test_explicit_kernel_strategies_need_the_capability(kvm, vm64, strategy, capability):
    if has_cap(kvm, Cap.PRE_FAULT_MEMORY):
        pytest.skip("capability 236 is set here")
    with HelperVcpus(vm64) as helpers:
        for vcpus in (None, helpers):  # the call's own helpers, then the caller's pool
            with pytest.raises(Unavailable) as info:
                prefault_vm(vm64, strategy=strategy, vcpus=vcpus)
            assert info.value.capability == capability and info.value.status == 2
            assert f"KVM_CAP_{capability}" in str(info.value) and "\n" not in str(info.value)
        assert len(helpers) == 0
    # Refused before any helper vCPU was created: the VM has no vCPU, and the top id (the
    # first a helper takes) is still free.
    assert vm64.vcpus == []
    top = vm64.check_extension(Cap.MAX_VCPU_ID) or kvm.check_extension(Cap.MAX_VCPU_ID)
    assert vm64.create_vcpu(top - 1).index == top - 1
    assert vm64.memory.resident_bytes() == 0


@pytest.mark.kvm
@pytest.mark.requires_cap("PRE_FAULT_MEMORY")
def test_kernel_strategy_splits_across_vcpus(vm64):
    with HelperVcpus(vm64) as helpers:
        report = prefault_vm(vm64, strategy="kernel", threads=2, vcpus=helpers)
        assert report.strategy == "kernel" and report.bytes_done == 80 * MiB
        assert report.threads == 2 and len(helpers) == 2 and len(helpers.get(2)) == 2
    assert any("read fault" in limit for limit in report.limits)
    # Without a pool the call makes its own helpers and closes them before returning.
    report = prefault_vm(vm64, strategy="kernel", threads=2)
    assert report.threads == 2 and len(vm64.vcpus) == 4
    for vcpu in vm64.vcpus:  # every helper's fd is closed; KVM keeps the vCPUs until the VM goes
        with pytest.raises(ValueError, match="is closed"):
            _ = vcpu.fd


@pytest.mark.kvm
def test_helper_vcpus_sit_at_the_top_and_are_reused(kvm):
    with kvm.create_vm() as vm, HelperVcpus(vm) as helpers:
        top = vm.check_extension(Cap.MAX_VCPU_ID) or kvm.check_extension(Cap.MAX_VCPU_ID)
        first = helpers.get(2)
        assert [v.index for v in first] == [top - 1, top - 2]
        assert helpers.get(1) == first[:1]
        assert vm.create_vcpu(0).index == 0  # the machine's own ids stay free
        # A second owner's helpers skip the ids the first one holds.
        with HelperVcpus(vm) as other:
            assert [v.index for v in other.get(1)] == [top - 3]


@pytest.mark.kvm
def test_helper_vcpus_leave_room_for_the_machines_own(kvm):
    """KVM counts every vCPU against KVM_CAP_MAX_VCPUS for the VM's life: helpers stop
    ``reserve`` short of it (at least one is made), so the owner's vCPUs still fit."""
    assert kernel.OWNER_VCPUS >= BootLayout.MAX_VCPUS
    with kvm.create_vm() as vm:
        limit = kernel.max_vcpus(vm)
        assert limit == (vm.check_extension(Cap.MAX_VCPUS) or kvm.check_extension(Cap.MAX_VCPUS))
        with HelperVcpus(vm, reserve=limit - 3) as helpers:
            assert len(helpers.get(8)) == 3
            assert len(helpers.get(8)) == 3  # no room left: the same three again
        with HelperVcpus(vm, reserve=limit) as squeezed:
            assert len(squeezed.get(2)) == 1  # no room at all, but one is the minimum


@pytest.mark.lab
@pytest.mark.kvm
def test_rfc_probe_reads_this_kernel(kvm, vm64):
    """The probe issues KVM_MAP_MEMORY (0xC020AED5) with a call the RFC would accept; a
    mainline kernel answers EINVAL, which can only mean "not the RFC"."""
    vcpu = HelperVcpus(vm64).get(1)[0]  # closed with the VM
    found = map_memory.probe(vcpu, 0)
    assert found.rfc is False and found.usable is False and "EINVAL" in found.reason
    taken: list[int] = []
    detected = map_memory.detect(vm64, lambda: taken.append(1) or vcpu, 0)
    assert detected.rfc is False
    if not has_cap(kvm, Cap.PRE_FAULT_MEMORY):
        assert taken == [] and "236" in detected.reason  # capability 0: nothing issued


# --- backends without KVM --------------------------------------------------------------
def test_memory_only_backend_gets_the_host_strategies():
    backend = MemoryOnlyBackend(32 * MiB)
    try:
        report = prefault_backend(backend, [(0, 32 * MiB)], strategy="auto", threads=2)
        assert report.strategy == "emulated" and "emulator backend has no KVM" in report.reason
        assert report.resident_bytes == 32 * MiB
        for strategy, capability in (("kernel", "PRE_FAULT_MEMORY"), ("map-memory", "MAP_MEMORY")):
            with pytest.raises(Unavailable) as info:
                prefault_backend(backend, None, strategy=strategy)
            assert info.value.capability == capability and "emulator backend" in str(info.value)
    finally:
        backend.close()


@pytest.mark.emulator
def test_emulator_backend_prefaults_in_process():
    from vmm.backends import open_backend

    backend = open_backend("emulator")
    try:
        backend.add_ram(0, 16 * MiB, "anon")
        report = prefault_backend(backend, None, strategy="auto")
        assert report.strategy == "emulated" and report.resident_bytes == 16 * MiB
        with pytest.raises(Unavailable):
            prefault_backend(backend, None, strategy="kernel")
    finally:
        backend.close()


# --- input checking ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ranges", "strategy", "threads", "message"),
    [
        ([(0, 32 * MiB)], "turbo", None, "unknown prefault strategy 'turbo'"),
        ([(0, 32 * MiB)], "host", 0, "at least 1"),
        ([(0, 33 * MiB)], "host", None, "no guest RAM at 0x2000000"),
        ([(PAGE + 1, PAGE)], "host", None, "not a non-empty page-aligned range"),
        ([(0, 0)], "host", None, "not a non-empty page-aligned range"),
        ([], "auto", None, "nothing to pre-populate"),
    ],
)
def test_bad_requests_are_input_errors(ranges, strategy, threads, message):
    backend = MemoryOnlyBackend(32 * MiB)
    try:
        with pytest.raises(InputError, match=re.escape(message)):
            prefault_backend(backend, ranges, strategy=strategy, threads=threads)
        assert backend.memory.resident_bytes() == 0
    finally:
        backend.close()


def test_work_is_split_inside_regions_at_2mib_boundaries():
    memory = GuestMemory()
    hosts = [HostMemory.allocate(6 * MiB, "anon"), HostMemory.allocate(4 * MiB, "anon")]
    memory.add(GuestRegion(0, 6 * MiB, hosts[0]))
    memory.add(GuestRegion(6 * MiB, 4 * MiB, hosts[1]))
    try:
        pieces = host_mod.split(memory, [(PAGE, 10 * MiB - 2 * PAGE)], threads=2)
        assert sum(p.size for p in pieces) == 10 * MiB - 2 * PAGE
        assert all(p.region.gpa <= p.gpa and p.gpa + p.size <= p.region.end for p in pieces)
        assert all((p.gpa + p.size) % (2 * MiB) == 0 for p in pieces[:-1])
        assert [p.gpa for p in pieces] == sorted(p.gpa for p in pieces)
    finally:
        for h in hosts:
            h.close()


# --- progress ----------------------------------------------------------------------------
def test_progress_sink_sees_every_byte():
    backend = MemoryOnlyBackend(32 * MiB)
    calls: list[tuple[int, int]] = []
    try:
        prefault_backend(backend, None, strategy="host", threads=2, progress=lambda d, t: calls.append((d, t)))
    finally:
        backend.close()
    assert calls and calls[-1] == (32 * MiB, 32 * MiB)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_bar_draws_only_on_a_tty_after_a_second(monkeypatch):
    quiet = progress_mod.TerminalBar("x", io.StringIO())
    quiet(1, 2)
    assert quiet.stream.getvalue() == ""  # not a TTY
    early = progress_mod.TerminalBar("x", FakeTty())
    early(1, 2)
    assert early.stream.getvalue() == ""  # under a second
    monkeypatch.setattr(progress_mod, "SHOW_AFTER_SECONDS", 0.0)
    bar = progress_mod.TerminalBar("prefault (host)", FakeTty())
    bar(MiB, 2 * MiB)
    assert "prefault (host)" in bar.stream.getvalue() and "50.0%" in bar.stream.getvalue()
    bar.close()
    assert bar.stream.getvalue().endswith("\r\x1b[K")


# --- map_memory with source, and the guest sees the contents -----------------------------
@pytest.mark.kvm
def test_map_memory_source_contents_reach_the_guest():
    """The RFC's ``source``: initial contents copied in as pages are mapped. Emulated here;
    the guest then reads every page and its checksum matches the source's."""
    base, pages = 2 * MiB, 64
    src = HostMemory.allocate(pages * PAGE, "anon")
    for i in range(pages):
        src.view[i * PAGE : i * PAGE + 8] = (0x1111_0000 + i).to_bytes(8, "little")

    class SourcedMachine(Machine):
        def _prefault(self, backend: Any, ranges: list[tuple[int, int]]) -> Any:
            with EmulatedPrefault(backend.memory) as emu:
                done = drive_map_memory(emu.map_memory, None, base, pages * PAGE, 1, src.addr)
            assert done == pages * PAGE
            return None

    try:
        config = MachineConfig.parse(
            image=str(GUESTS / "readpages64.elf"),
            mem="8M",
            prefault="emulated",
            backend="kvm",
            args={"base": hex(base), "pages": str(pages)},
            timeout=30,
        )
        result = SourcedMachine(config).run()
    finally:
        src.close()
    assert result.status == 1, result.reason
    expected = sum(0x1111_0000 + i for i in range(pages))
    assert f"checksum 0x{expected:016x}".encode() in result.console


def test_map_memory_driver_reports_where_it_stopped():
    memory = GuestMemory()
    memory.add(GuestRegion(0, 2 * MiB, HostMemory.allocate(2 * MiB, "anon")))
    try:
        with EmulatedPrefault(memory) as emu, pytest.raises(PrefaultError) as info:
            drive_map_memory(emu.map_memory, None, MiB, 2 * MiB)
        assert info.value.errno == errno.EFAULT and info.value.gpa == 2 * MiB and info.value.size == MiB
        assert "0x200000" in str(info.value)
    finally:
        for r in memory:
            r.host.close()


# --- the machine path (vmm run --prefault) ----------------------------------------------
@pytest.mark.lab
@pytest.mark.kvm
def test_machine_reports_ram_resident_before_the_guest_starts():
    config = MachineConfig.parse(
        image=str(GUESTS / "memtouch64.elf"), mem="64M", prefault="auto", backend="kvm", timeout=30
    )
    result = Machine(config).run()
    assert result.status == 1, result.reason
    report = result.to_json()["prefault"]
    assert {"strategy_used", "reason", "bytes_done", "seconds", "resident_bytes"} <= report.keys()
    assert report["bytes_done"] == report["resident_bytes"] == 64 * MiB
    assert "resident" in result.prefault.summary()


def test_prefault_memory_without_a_vm_rejects_kernel_with_the_reason():
    memory = GuestMemory()
    memory.add(GuestRegion(0, MiB, HostMemory.allocate(MiB, "anon")))
    try:
        with pytest.raises(Unavailable, match="no KVM VM was given"):
            prefault_memory(memory, strategy="kernel")
    finally:
        for r in memory:
            r.host.close()


# --- the parallel runner -------------------------------------------------------------------
def test_every_worker_exists_before_any_piece_is_worked_and_errors_surface():
    """Workers are released together (a thread created while another populates would
    wait for the mm's mmap_lock); the first error stops the rest and is re-raised."""
    memory = GuestMemory()
    with HostMemory.allocate(16 * MiB, "anon") as h:
        memory.add(GuestRegion(0, 16 * MiB, h))
        pieces = host_mod.split(memory, [(0, 16 * MiB)], threads=3)
        alive: list[int] = []

        def count(_i: int, _p: host_mod.Piece) -> None:
            alive.append(sum(t.name.startswith("prefault-") for t in threading.enumerate()))

        host_mod.run_parallel(pieces, 3, count, progress_mod.Progress(16 * MiB))
        assert len(alive) == len(pieces) and alive[0] == 3

        def fail(_i: int, p: host_mod.Piece) -> None:
            if p.gpa == pieces[1].gpa:
                raise PrefaultError("test", errno.EFAULT, p.gpa, p.size)

        with pytest.raises(PrefaultError) as info:
            host_mod.run_parallel(pieces, 3, fail, progress_mod.Progress(16 * MiB))
        assert info.value.gpa == pieces[1].gpa
        assert not any(t.name.startswith("prefault-") for t in threading.enumerate())
