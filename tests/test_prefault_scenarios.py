"""The kernel's pre-fault scenarios (kvm-abi.md §3, §9-B, §9-C), written once and run
against every implementation of the KVM_PRE_FAULT_MEMORY contract:

``kernel``    the real ioctl on a vCPU fd. The semantic cases need
              KVM_CAP_PRE_FAULT_MEMORY (skipped on shadow-paging hosts with that reason;
              they run in the nested lab); the argument checks run on any KVM, because
              KVM validates arguments before it looks at the MMU.
``emulated``  :class:`vmm.prefault.EmulatedPrefault`, everywhere.

Both must give the same answers. Keep the kernel cases small: the lab runs them under
TCG, about 15 times slower. Select them with ``-k kernel``.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import kvm_abi as abi
from kvm_abi import ffi
from vmm.config import MachineConfig
from vmm.machine import Machine
from vmm.memory import GuestMemory, GuestRegion, HostMemory
from vmm.prefault import EmulatedPrefault, HelperVcpus, PrefaultInterrupted, kernel
from vmm.prefault.contract import drive_pre_fault, new_range
from vmm.vcpu import KICK_SIGNAL, ensure_kick_handler

PAGE = 4096
SZ_2M = 2 << 20
TEST_SIZE = SZ_2M + PAGE  # the selftest's slot: 513 pages
TEST_NPAGES = TEST_SIZE // PAGE
GUESTS = Path(__file__).resolve().parent.parent / "guests"

KERNEL_WITH_CAP = pytest.param(
    "kernel", marks=[pytest.mark.kvm, pytest.mark.requires_cap("PRE_FAULT_MEMORY")], id="kernel"
)
KERNEL_ANY_KVM = pytest.param("kernel", marks=[pytest.mark.kvm, pytest.mark.lab], id="kernel")
SEMANTICS = [KERNEL_WITH_CAP, pytest.param("emulated", id="emulated")]
VALIDATION = [KERNEL_ANY_KVM, pytest.param("emulated", id="emulated")]


# --- the implementations under test -----------------------------------------------------
@dataclass
class Target:
    """One implementation plus the guest memory it pre-faults: ``call(vcpu, struct)``
    is the contract, ``add_slot``/``remove_slot`` change the memory map under it."""

    name: str
    memory: GuestMemory
    call: Callable[[Any, Any], int]
    vcpu: Any
    add_slot: Callable[..., GuestRegion]
    remove_slot: Callable[[GuestRegion], None]
    extra_vcpus: Callable[[int], list[Any]]
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def one_call(self, gpa: int, size: int, flags: int = 0, padding: int = 0) -> tuple[int, Any]:
        rng = new_range(gpa, size, flags)
        rng.padding[0] = padding
        return self.call(self.vcpu, rng), rng


def kernel_target(kvm: Any) -> Target:
    vm = kvm.create_vm()
    helpers = HelperVcpus(vm)  # the target owns the VM, so it owns the helpers (closed with it)
    vcpu = helpers.get(1)[0]

    def add_slot(gpa: int, size: int, readonly: bool = False, backing: str = "anon") -> GuestRegion:
        return vm.add_memory(gpa, size, backing, readonly=readonly)

    return Target(
        "kernel",
        vm.memory,
        kernel.pre_fault_memory,
        vcpu,
        add_slot,
        vm.remove_memory,
        helpers.get,
        [helpers.close, vm.close],
    )


def emulated_target() -> Target:
    memory = GuestMemory()
    emu = EmulatedPrefault(memory)

    def add_slot(gpa: int, size: int, readonly: bool = False, backing: str = "anon") -> GuestRegion:
        host = HostMemory.allocate(size, backing)
        return memory.add(GuestRegion(gpa, size, host, flags=int(abi.MemFlag.READONLY) if readonly else 0))

    def remove_slot(region: GuestRegion) -> None:
        memory.remove(region)
        region.host.close()

    def close() -> None:
        for region in memory:
            remove_slot(region)
        emu.close()

    return Target("emulated", memory, emu.pre_fault_memory, None, add_slot, remove_slot, lambda n: [None] * n, [close])


def make_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    target = kernel_target(request.getfixturevalue("kvm")) if request.param == "kernel" else emulated_target()
    try:
        yield target
    finally:
        for undo in target.cleanup:
            undo()


@pytest.fixture(params=SEMANTICS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    yield from make_target(request)


@pytest.fixture(params=VALIDATION)
def any_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    yield from make_target(request)


# --- the selftest's helper, ported -------------------------------------------------------
def pre_fault(target: Target, gpa: int, size: int, expected_left: int, vcpu: Any = None) -> None:
    """pre_fault_memory() of pre_fault_memory_test.c: loop ``while (ret >= 0 ? size != 0
    : errno == EINTR)``, asserting "size decreased XOR error" after every call."""
    vcpu = target.vcpu if vcpu is None else vcpu
    rng = new_range(gpa, size)
    prev = size
    while True:
        rc = target.call(vcpu, rng)
        decreased = rng.size < prev
        assert decreased != (rc != 0), f"{target.name}: rc={errno.errorcode.get(rc, rc)} size {prev:#x}->{rng.size:#x}"
        assert rng.gpa + rng.size == gpa + size, "gpa and size must move together"
        prev = rng.size
        if not (rng.size != 0 if rc == 0 else rc == errno.EINTR):
            break
    assert rng.size == expected_left, f"{target.name}: {rng.size:#x} left, expected {expected_left:#x}"
    if expected_left == 0:
        assert rc == 0
    else:
        assert rc == errno.ENOENT, f"{target.name}: {errno.errorcode.get(rc, rc)}, expected ENOENT"


def three_calls(target: Target, base: int) -> None:
    """A: the first 2 MiB; B: runs off the slot's end; C: entirely outside."""
    pre_fault(target, base, SZ_2M, 0)
    pre_fault(target, base + SZ_2M, 2 * PAGE, PAGE)
    pre_fault(target, base + TEST_SIZE, PAGE, PAGE)


def top_of_guest_physical() -> int:
    """The selftest's placement: TEST_NPAGES below the top of the guest-physical space
    (CPUID 0x80000008 MAXPHYADDR, as KVM reports it), rounded down to 2 MiB."""
    bits = 48
    try:
        from vmm.kvm import Kvm

        with Kvm() as kvm:
            cpuid = kvm.get_supported_cpuid()
            for i in range(cpuid.nent):
                if cpuid.entries[i].function == 0x80000008:
                    bits = cpuid.entries[i].eax & 0xFF
    except Exception:  # no KVM: the emulation has no limit of its own; use the common 48
        pass
    return ((1 << bits) // PAGE - TEST_NPAGES) * PAGE // SZ_2M * SZ_2M


# --- C: semantics ----------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["low", "top"])
def test_three_calls_full_range_off_the_end_and_outside(target, placement):
    base = 0xC000_0000 if placement == "low" else top_of_guest_physical()
    target.add_slot(base, TEST_SIZE)
    three_calls(target, base)


def test_no_second_call_once_size_is_zero(target):
    target.add_slot(0x10_0000, SZ_2M)
    rc, rng = target.one_call(0x10_0000, SZ_2M)
    assert rc == 0 and rng.size == 0
    # Retrying the finished struct is the bug the drivers avoid: size 0 is EINVAL.
    assert target.call(target.vcpu, rng) == errno.EINVAL
    assert rng.gpa == 0x10_0000 + SZ_2M and rng.size == 0


def test_read_only_slot_prefaults(target):
    target.add_slot(0x20_0000, SZ_2M, readonly=True)
    pre_fault(target, 0x20_0000, SZ_2M, 0)


def test_adjacent_slots_prefault_as_one_range(target):
    target.add_slot(0x40_0000, SZ_2M)
    target.add_slot(0x60_0000, SZ_2M)
    pre_fault(target, 0x50_0000, SZ_2M, 0)


def test_range_over_two_slots_with_a_gap_stops_at_the_gap(target):
    """Slots at [4M, 6M) and [8M, 10M): one range over both maps the first slot, answers 0
    with the rest left, then ENOENT at the gap; the second slot is untouched until asked."""
    first, second = target.add_slot(0x40_0000, SZ_2M), target.add_slot(0x80_0000, SZ_2M)
    pre_fault(target, 0x40_0000, 3 * SZ_2M, 2 * SZ_2M)
    rc, rng = target.one_call(0x60_0000, SZ_2M)
    assert rc == errno.ENOENT and (rng.gpa, rng.size) == (0x60_0000, SZ_2M)  # no progress in a gap
    pre_fault(target, 0x80_0000, SZ_2M, 0)
    if target.name == "emulated":  # the host half is visible: both slots are now resident
        assert first.host.resident_bytes() == second.host.resident_bytes() == SZ_2M


@pytest.mark.kvm
@pytest.mark.requires_cap("PRE_FAULT_MEMORY")
def test_guest_memfd_shared_slot_on_a_default_vm_prefaults(kvm):
    """A guest_memfd created with MMAP | INIT_SHARED backs a slot of a default VM: its
    memory is shared, so the pre-fault maps it like anonymous memory, the three calls as
    on any slot. Newer kernels offer it (7.3 in the lab); 6.12 has no guest_memfd on a
    default VM, which is the kernel's age, not a missing capability of the host: a skip
    the lab's --vmm-require-kvm lets through."""
    shared = int(abi.GuestMemfdFlag.MMAP | abi.GuestMemfdFlag.INIT_SHARED)
    with kvm.create_vm() as probe:
        if not probe.check_extension(abi.Cap.GUEST_MEMFD):
            pytest.skip(f"Linux {os.uname().release} has no guest_memfd on a default VM (KVM_CAP_GUEST_MEMFD 0)")
        if probe.check_extension(abi.Cap.GUEST_MEMFD_FLAGS) & shared != shared:
            pytest.skip("guest_memfd lacks MMAP | INIT_SHARED here (KVM_CAP_GUEST_MEMFD_FLAGS)")
    target = kernel_target(kvm)
    try:
        base = 0xC000_0000
        target.add_slot(base, TEST_SIZE, backing="guest-memfd")
        three_calls(target, base)
    finally:
        for undo in target.cleanup:
            undo()


def test_parallel_vcpus_on_overlapping_ranges_all_succeed(target):
    target.add_slot(0x100_0000, 4 * SZ_2M)
    vcpus = target.extra_vcpus(3)
    outcomes: list[tuple[int, int]] = []

    def run(vcpu: Any, offset: int) -> None:
        rc, rng = 0, new_range(0x100_0000 + offset, 3 * SZ_2M - offset)
        while rng.size and rc in (0, errno.EINTR):
            rc = target.call(vcpu, rng)
        outcomes.append((rc, rng.size))

    threads = [threading.Thread(target=run, args=(v, i * PAGE * 16)) for i, v in enumerate(vcpus)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Another vCPU's mapping makes the fault spurious, which is success: no EAGAIN here.
    assert outcomes == [(0, 0)] * len(vcpus)


def test_eintr_leaves_the_range_untouched_or_reports_progress(target):
    """Signals keep arriving while a large range is pre-faulted: every call either
    fails with EINTR and leaves gpa/size alone, or returns 0 having made progress."""
    size = 64 << 20
    target.add_slot(1 << 30, size, backing="thp")
    if target.name == "kernel":
        if not ensure_kick_handler():
            pytest.skip("needs the compiled no-op signal handler (kvm_abi built in API mode)")
        signo = KICK_SIGNAL  # a C no-op handler without SA_RESTART: the ioctl sees EINTR
    else:
        signo = signal.SIGUSR1  # blocked in this thread, so the emulation sees it pending
    me = threading.get_ident()
    stop = threading.Event()
    seen: list[int] = []

    def pester() -> None:
        while not stop.wait(0.001):
            signal.pthread_kill(me, signo)

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signo]) if target.name == "emulated" else None
    sender = threading.Thread(target=pester)
    sender.start()
    try:
        rng = new_range(1 << 30, size)
        while rng.size:
            before = (rng.gpa, rng.size)
            rc = target.call(target.vcpu, rng)
            seen.append(rc)
            if rc:
                assert rc == errno.EINTR and (rng.gpa, rng.size) == before
                if old_mask is not None:
                    signal.sigtimedwait([signo], 0)  # what delivery would have done
            else:
                assert rng.size < before[1]
    finally:
        stop.set()
        sender.join()
        if old_mask is not None:
            while signal.sigtimedwait([signo], 0) is not None:
                pass
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    assert rng.size == 0 and rng.gpa == (1 << 30) + size
    assert set(seen) <= {0, errno.EINTR}


def test_slot_deleted_and_recreated_during_prefault_converges(target):
    """The 6.18 selftest's worker: the slot is deleted as the call starts; the first
    answer may be anything the race allows; after the slot is back the result is exact."""
    if target.name == "kernel" and tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) < (6, 18):
        pytest.skip("before Linux 6.18 a pre-fault racing a memslot deletion can hang (no EAGAIN yet)")
    base = 0x8000_0000
    for gpa, size, left in ((base, SZ_2M, 0), (base + SZ_2M, 2 * PAGE, PAGE), (base + TEST_SIZE, PAGE, PAGE)):
        slot = [target.add_slot(base, TEST_SIZE)]
        ready, recreate = threading.Event(), threading.Event()

        def worker(slot: list[GuestRegion] = slot, ready: threading.Event = ready, again: threading.Event = recreate):
            ready.wait()
            target.remove_slot(slot[0])
            again.wait()
            slot[0] = target.add_slot(base, TEST_SIZE)

        t = threading.Thread(target=worker)
        t.start()
        rng = new_range(gpa, size)
        prev, first = size, True
        ready.set()
        while True:
            rc = target.call(target.vcpu, rng)
            assert (rng.size < prev) != (rc != 0)
            prev = rng.size
            if rc == errno.EINTR:
                continue
            if first:
                first = False
                recreate.set()
                t.join()
                if rng.size:
                    continue
            if rng.size == 0 or rc:
                break
        assert rng.size == left
        assert rc == (0 if left == 0 else errno.ENOENT)
        target.remove_slot(slot[0])


# --- B: argument validation (also against this host's real kernel) --------------------
@pytest.mark.parametrize(
    ("gpa", "size", "flags"),
    [
        pytest.param(0x10_0000, SZ_2M, 1, id="flags=1"),
        pytest.param(0x10_0000, 0, 0, id="size=0"),
        pytest.param(0x10_0001, SZ_2M, 0, id="unaligned-gpa"),
        pytest.param(0x10_0000, 100, 0, id="unaligned-size"),
        pytest.param((1 << 64) - PAGE, 2 * PAGE, 0, id="wrap-around"),
        pytest.param((1 << 64) - PAGE, PAGE, 0, id="ends-at-2^64"),
    ],
)
def test_invalid_arguments_are_einval_and_leave_the_struct_alone(any_target, gpa, size, flags):
    any_target.add_slot(0x10_0000, SZ_2M)
    rc, rng = any_target.one_call(gpa, size, flags)
    assert rc == errno.EINVAL, errno.errorcode.get(rc, rc)
    assert (rng.gpa, rng.size, rng.flags) == (gpa, size, flags)


def test_padding_is_not_validated(any_target):
    any_target.add_slot(0x10_0000, SZ_2M)
    rc, _ = any_target.one_call(0x10_0000, SZ_2M, padding=0xDEAD)
    assert rc != errno.EINVAL
    if any_target.name == "emulated" or kernel_has_prefault():
        assert rc == 0


def kernel_has_prefault() -> bool:
    from kvm_abi import Cap
    from vmm.kvm import Kvm

    with Kvm() as kvm:
        return bool(kvm.check_extension(Cap.PRE_FAULT_MEMORY))


@pytest.mark.kvm
def test_valid_call_without_the_capability_is_eopnotsupp(kvm):
    """This host: KVM_CAP_PRE_FAULT_MEMORY is 0, the checks above pass, then EOPNOTSUPP;
    even outside every memslot (the TDP check comes before the memslot lookup)."""
    if kernel_has_prefault():
        pytest.skip("KVM_CAP_PRE_FAULT_MEMORY is set here: valid calls succeed")
    t = kernel_target(kvm)
    try:
        t.add_slot(0x10_0000, SZ_2M)
        for gpa in (0x10_0000, 0x4000_0000):
            rc, rng = t.one_call(gpa, SZ_2M)
            assert rc == errno.EOPNOTSUPP, errno.errorcode.get(rc, rc)
            assert (rng.gpa, rng.size) == (gpa, SZ_2M)
    finally:
        t.cleanup[0]()


@pytest.mark.lab
@pytest.mark.kvm
@pytest.mark.parametrize("number", [0xC020AED5, 0xC018AED5], ids=["rfc-v1-32-bytes", "rfc-v2-24-bytes"])
def test_old_rfc_numbers_are_einval_on_mainline(kvm, number):
    t = kernel_target(kvm)
    try:
        t.add_slot(0x10_0000, SZ_2M)
        op = abi.Ioctl(f"ioctl {number:#x}", number, None)
        arg = ffi.new("uint64_t[4]", [0x10_0000 >> 12, 1, 0, 0])
        with pytest.raises(abi.KvmError) as info:
            abi.ioctl(t.vcpu.fd, op, arg)
        assert info.value.errno == errno.EINVAL
        assert list(arg) == [0x10_0000 >> 12, 1, 0, 0]
    finally:
        t.cleanup[0]()


def test_eintr_is_reported_with_a_pending_signal_and_the_driver_stops_on_it():
    """Deterministic half of the EINTR contract for the emulation: a signal pending
    before the call gives EINTR with nothing done; once it is taken, the call works."""
    t = emulated_target()
    t.add_slot(0, SZ_2M)
    result: dict[str, Any] = {}

    def body() -> None:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
        try:
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
            result["rc"], rng = t.one_call(0, SZ_2M)
            result["unchanged"] = (rng.gpa, rng.size) == (0, SZ_2M)
            try:
                drive_pre_fault(t.call, None, 0, SZ_2M)
            except PrefaultInterrupted as e:
                result["driver"] = e
            signal.sigwait([signal.SIGUSR2])
            result["after"] = drive_pre_fault(t.call, None, 0, SZ_2M)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    t.cleanup[0]()
    assert result["rc"] == errno.EINTR and result["unchanged"]
    assert isinstance(result.get("driver"), PrefaultInterrupted) and result["driver"].gpa == 0
    assert result["after"] == SZ_2M


# --- the guest reads every page afterwards ----------------------------------------------
def backend_target(name: str, backend: Any) -> Target:
    """The implementation ``name`` over a running machine's backend."""
    if name == "kernel":
        vm = backend.vm
        vcpu = HelperVcpus(vm).get(1)[0]  # closed with the backend's VM
        return Target("kernel", vm.memory, kernel.pre_fault_memory, vcpu, vm.add_memory, vm.remove_memory, list)
    emu = EmulatedPrefault(backend.memory)
    return Target("emulated", backend.memory, emu.pre_fault_memory, None, list, list, list, [emu.close])


GUEST_CASES = [
    pytest.param(("kernel", "kvm"), marks=[pytest.mark.kvm, pytest.mark.requires_cap("PRE_FAULT_MEMORY")], id="kernel"),
    pytest.param(("emulated", "kvm"), marks=pytest.mark.kvm, id="emulated-on-kvm"),
    pytest.param(("emulated", "emulator"), marks=pytest.mark.emulator, id="emulated-on-emulator"),
]
BASE = SZ_2M  # the test window [2 MiB, 4 MiB + 4 KiB) ends exactly where guest RAM ends


def pattern(gpa: int) -> int:
    """What the host writes at odd pages of the window (even pages stay never-touched)."""
    return (gpa * 0x9E3779B1 + 1) & ((1 << 64) - 1)


@pytest.mark.parametrize("case", GUEST_CASES)
def test_guest_reads_every_page_after_the_three_calls(case):
    name, backend_name = case

    def before_boot(machine: Machine) -> None:
        backend = machine.backend
        for page in range(1, TEST_NPAGES, 2):
            backend.memory.write_u64(BASE + page * PAGE, pattern(BASE + page * PAGE))
        t = backend_target(name, backend)
        three_calls(t, BASE)
        for undo in t.cleanup:
            undo()

    config = MachineConfig.parse(
        image=str(GUESTS / "readpages64.elf"),
        mem=BASE + TEST_SIZE,
        backend=backend_name,
        args={"base": hex(BASE), "pages": str(TEST_NPAGES)},
        timeout=60,
    )
    result = Machine(config, before_boot=before_boot).run()
    assert result.status == 1 and result.exit_value == 0, result.reason
    expected = sum(pattern(BASE + p * PAGE) for p in range(1, TEST_NPAGES, 2)) & ((1 << 64) - 1)
    m = re.search(rb"readpages: (\d+) pages from 0x([0-9a-f]+), checksum 0x([0-9a-f]+)", result.console)
    assert m, result.console
    assert (int(m[1]), int(m[2], 16), int(m[3], 16)) == (TEST_NPAGES, BASE, expected)


@pytest.mark.parametrize("case", GUEST_CASES)
def test_guest_writes_after_prefault_reach_the_host(case):
    """Pre-faulted (for KVM: read-mapped, the zero page) memory must still take the
    guest's writes: the host sees what memtouch wrote, one qword per page."""
    name, backend_name = case
    seen: dict[int, int] = {}

    def before_boot(machine: Machine) -> None:
        t = backend_target(name, machine.backend)
        pre_fault(t, BASE, TEST_SIZE, 0)
        for undo in t.cleanup:
            undo()

    def after_run(machine: Machine) -> None:
        for page in range(TEST_NPAGES):
            gpa = BASE + page * PAGE
            seen[gpa] = machine.backend.memory.read_u64(gpa)

    config = MachineConfig.parse(
        image=str(GUESTS / "memtouch64.elf"),
        mem=BASE + TEST_SIZE,
        backend=backend_name,
        args={"passes": "1"},
        timeout=60,
    )
    result = Machine(config, before_boot=before_boot, after_run=after_run).run()
    assert result.status == 1, result.reason
    assert seen == {gpa: gpa for gpa in seen} and len(seen) == TEST_NPAGES  # pass 0 writes gpa + 0
