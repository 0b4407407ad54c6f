"""The KVM backend: guest RAM in memslots, vCPUs in KVM_RUN, one thread each.

The run loop is the hot path: a port exit is one C call (KVM_RUN plus the exit folded
into an int), one dict hit and the device's own code, with the device's arguments
bound once per port; no per-exit allocation.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable

import kvm_abi as abi
from kvm_abi import Cap, KvmError, MpState, ffi
from kvm_abi.types import Cpuid2
from vmm import exits as ex
from vmm.backends.base import NEVER_STARTED, STOPPED, DebugHook, ExitCounts, StopFlag
from vmm.backends.kvm_coalesced import CoalescedRing
from vmm.backends.kvm_idle import IdleWatch
from vmm.backends.kvm_state import apply_state, read_regs
from vmm.backends.kvm_xsave import without_xsave, xsetbv_reaches_kvm
from vmm.cpu.state import CpuState
from vmm.devices.bus import Bus
from vmm.errors import ConfigError, Unavailable
from vmm.exits import Ending, Next, VcpuOutcome, dispatch
from vmm.kvm import Kvm
from vmm.memory import Backing, GuestMemory, GuestRegion
from vmm.vcpu import Vcpu, ensure_kick_handler
from vmm.vm import Vm

_EINTR = -errno.EINTR
_EAGAIN = -errno.EAGAIN


CPUID1_ECX_X2APIC = 1 << 21
CPUID1_ECX_TSC_DEADLINE = 1 << 24
CPUID1_ECX_HYPERVISOR = 1 << 31
CPUID1_EDX_APIC = 1 << 9
MSR_IA32_APIC_BASE = 0x1B


def cpuid_for_vcpu(supported: Cpuid2, index: int, *, irqchip: bool = True, tsc_deadline: bool = False) -> Cpuid2:
    """A copy of KVM's supported CPUID for vCPU ``index``: its APIC id filled in (leaf 1
    EBX bits 31:24, leaves 0xb/0x1f EDX), as a guest enumerating CPUs expects, and the
    hypervisor bit (leaf 1 ECX bit 31: KVM 6.12 leaves it out of its supported CPUID, and
    without it Linux does not look for KVM's leaves 0x40000000, so no kvmclock). With the
    in-kernel irqchip, x2APIC as KVM offers it and TSC-deadline where KVM_CAP_TSC_DEADLINE_TIMER
    says so (KVM reports that one as a capability, not in its CPUID); without one, no local
    APIC at all, so a guest does not poll registers nobody implements."""
    n = supported.nent
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
    ffi.memmove(cpuid.entries, supported.entries, n * ffi.sizeof("struct kvm_cpuid_entry2"))
    for i in range(n):
        e = cpuid.entries[i]
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | ((index & 0xFF) << 24)
            e.ecx |= CPUID1_ECX_HYPERVISOR
            if not irqchip:
                e.ecx &= ~(CPUID1_ECX_X2APIC | CPUID1_ECX_TSC_DEADLINE)
                e.edx &= ~CPUID1_EDX_APIC
            elif tsc_deadline:
                e.ecx |= CPUID1_ECX_TSC_DEADLINE
        elif e.function in (0xB, 0x1F):
            e.edx = index
    return cpuid


class KvmVcpuRunner:
    """A KVM vCPU driven by the machine's run loop.

    With the in-kernel irqchip an application processor (index > 0) starts the way a PC's
    does: its local APIC holds it in KVM_RUN until INIT/SIPI (``park()`` leaves it so);
    ``set_state()`` makes it runnable at once, the project's own contract. HLT then never
    exits to userspace, so the machine asks each vCPU, through :meth:`request_probe`, for
    its MP state and RFLAGS to tell a vCPU that waits for an interrupt from one that can
    never run again (:mod:`vmm.backends.kvm_idle`).
    """

    __slots__ = (
        "index",
        "vcpu",
        "counts",
        "debug",
        "_fast",
        "_irqchip",
        "_parked",
        "_probe",
        "_probe_done",
        "probe_result",
        "_ring",
    )

    def __init__(self, vcpu: Vcpu, cpuid: Cpuid2, *, irqchip: bool = False, ring: CoalescedRing | None = None) -> None:
        self.index = vcpu.index
        self._ring = ring
        self.vcpu = vcpu
        self.counts = ExitCounts()
        self.debug: DebugHook | None = None  # a gdb stub's session (vmm.gdb), when attached
        self._fast: dict[int, Callable[[], None]] = {}
        self._irqchip = irqchip
        self._parked = False
        self._probe = False
        self._probe_done = threading.Event()
        self.probe_result: tuple[int, int] | None = None  # (mp_state, rflags) at the last probe
        vcpu.set_cpuid2(cpuid)
        if not irqchip:
            # KVM derives CPUID.1:EDX.APIC from IA32_APIC_BASE's enable bit (set at reset
            # even without a local APIC): disable it, so the guest sees no APIC at all.
            vcpu.set_msrs({MSR_IA32_APIC_BASE: 0})

    def set_state(self, state: CpuState) -> None:
        apply_state(self.vcpu, state)
        self._parked = False
        if self._irqchip and self.index != 0:
            # The in-kernel LAPIC starts an AP in UNINITIALIZED (waiting for SIPI).
            self.vcpu.set_mp_state(MpState.RUNNABLE)

    def park(self) -> None:
        """Leave this vCPU waiting for INIT/SIPI from another vCPU's local APIC, as a PC's
        application processors start. Without the in-kernel irqchip nothing can start it:
        its loop then ends at once as "never started"."""
        self._parked = True

    def request_probe(self) -> None:
        """From another thread: make the vCPU's loop record (mp_state, rflags) in
        ``probe_result`` at its next pass through userspace (a kick forces one)."""
        self._probe_done.clear()
        self._probe = True
        self.vcpu.kick()

    def wait_probe(self, timeout: float) -> tuple[int, int] | None:
        """The answer to the last :meth:`request_probe`, or None if none came in time."""
        return self.probe_result if self._probe_done.wait(timeout) else None

    def _answer_probe(self) -> None:
        self._probe = False
        try:
            self.probe_result = (self.vcpu.get_mp_state(), int(self.vcpu.get_regs().rflags))
        except KvmError:
            self.probe_result = None
        self._probe_done.set()

    def regs(self) -> dict[str, int]:
        return read_regs(self.vcpu)

    def kick(self) -> None:
        self.vcpu.kick()

    def close(self) -> None:
        self.vcpu.close()

    def run_loop(self, bus: Bus, stop: StopFlag) -> VcpuOutcome:
        if self._parked and not self._irqchip:
            return NEVER_STARTED
        vcpu = self.vcpu
        vcpu.bind_thread()
        debug = self.debug
        try:
            if debug is not None:
                debug.enter(self)  # with -S: held here until gdb continues
            return self._loop(bus, stop)
        finally:
            if self._ring is not None:  # writes made since the last exit
                self._ring.drain(bus)
            if debug is not None:
                debug.leave(self)
            vcpu.unbind_thread()

    def _loop(self, bus: Bus, stop: StopFlag) -> VcpuOutcome:
        # The hot path. ``run_vcpu`` (C in the compiled module) does KVM_RUN and folds a
        # single port access into one int; ``fast`` maps that int to the device call with
        # its arguments bound (the data view is a fixed slice of the PIO page), so a port
        # exit costs one C call, one dict hit and the device's own code: no field reads,
        # no allocation. Everything else takes the general path below.
        vcpu = self.vcpu
        run = vcpu.run_struct
        fd = vcpu.fd
        run_vcpu = abi.run_vcpu
        fast = self._fast
        fast_get = fast.get
        counts = self.counts
        n_io = n_intr = 0
        # With coalesced registers, writes wait in the VM's ring until an exit: replay them
        # before handling that exit (a read of the same device, or a write once the ring
        # is full, then sees them in order), as the kernel documents.
        ring = self._ring.ring if self._ring is not None else None
        drain = self._ring.drain if self._ring is not None else None
        # `stop` is read only after EINTR: the machine never sets it without kicking every
        # vCPU, and a kick sets immediate_exit first, so the next KVM_RUN (this thread's
        # own, after a device asked to stop) returns EINTR at once.
        try:
            while True:
                code = run_vcpu(fd, run)
                if ring is not None and ring.first != ring.last:
                    drain(bus)  # type: ignore[misc]  # set together with ring
                call = fast_get(code)
                if call is not None:
                    n_io += 1
                    call()
                    continue
                if code < 0:
                    if code in (_EINTR, _EAGAIN):  # a kick, or a signal: look at `stop`
                        run.immediate_exit = 0
                        n_intr += 1
                        if stop.requested:
                            return STOPPED
                        if self._probe:
                            self._answer_probe()
                        if self.debug is not None and self.debug.paused:
                            self.debug.park(self)  # gdb stopped the guest (all-stop)
                        continue
                elif code & abi.FAST_IO:
                    n_io += 1
                    self._first_port_access(bus, code)
                    continue
                # Everything else: the one decoder, the one dispatch (vmm.exits).
                exit_ = vcpu.decode_exit() if code >= 0 else vcpu.decode_failure(-code)
                counts.record(exit_)
                if type(exit_) is ex.Debug and self.debug is not None:
                    self.debug.debug_exit(self, exit_)  # a breakpoint or a step: gdb decides
                    continue
                step = dispatch(bus, exit_)
                if step is Next.RUN:
                    continue
                if step is Next.CHECK_STOP:  # KVM_EXIT_INTR: a signal without EINTR
                    if stop.requested:
                        return STOPPED
                    if self.debug is not None and self.debug.paused:
                        self.debug.park(self)
                    continue
                assert isinstance(step, VcpuOutcome)
                if step.kind is not Ending.CRASHED:
                    return step
                if self.debug is not None:
                    self.debug.crashed(self)  # gdb sees the crash before the run ends
                return step.at(self._rip())
        finally:
            counts.io += n_io
            counts.interrupted += n_intr

    def _first_port_access(self, bus: Bus, code: int) -> None:
        """A single port access not seen before: do it, and remember the bound call for
        the next time when a device claims the port."""
        direction, size, port = abi.fast_io_fields(code)
        data = self.vcpu.shared_page[abi.PIO_DATA_OFFSET : abi.PIO_DATA_OFFSET + size]
        out = direction == abi.KVM_EXIT_IO_OUT
        write_table, read_table = bus.pio_handlers()
        entry = (write_table if out else read_table).get(port)
        if entry is not None:
            handler, offset = entry
            self._fast[code] = functools.partial(handler, offset, data)
            handler(offset, data)
        else:  # unclaimed: counted, logged, strict
            dispatch(bus, ex.IoOut(port, size, 1, data) if out else ex.IoIn(port, size, 1, data))

    def _rip(self) -> int | None:
        try:
            return self.regs()["rip"]
        except KvmError:
            return None


_SYSTEM_FACTS: dict[tuple[str, int], tuple[Cpuid2, int]] = {}
_SYSTEM_FACTS_LOCK = threading.Lock()


def _system_facts(kvm: Kvm) -> tuple[Cpuid2, int]:
    """(KVM_GET_SUPPORTED_CPUID, the most vCPUs) of this KVM device: answers of /dev/kvm
    itself, the same for every VM, so asked once per process and device (the CPUID ioctl
    costs ~0.5 ms, a tenth of a whole small lifecycle). Callers copy the CPUID before
    changing it (``cpuid_for_vcpu``). A KVM module reloaded while the process runs is not
    noticed."""
    key = (kvm.path, os.fstat(kvm.fd).st_rdev)
    with _SYSTEM_FACTS_LOCK:
        facts = _SYSTEM_FACTS.get(key)
        if facts is None:
            max_vcpus = kvm.check_extension(Cap.MAX_VCPUS) or kvm.check_extension(Cap.NR_VCPUS) or 4
            facts = _SYSTEM_FACTS[key] = (kvm.get_supported_cpuid(), max_vcpus)
    return facts


class KvmBackend:
    """KVM: a VM with memslots; vCPUs run in the kernel.

    ``irqchip=True`` (the default, as on a PC) creates the in-kernel interrupt controllers
    before any vCPU: KVM_CREATE_IRQCHIP (PIC, IOAPIC at 0xfec00000, a local APIC at
    0xfee00000 per vCPU, and KVM's default GSI routing) and KVM_CREATE_PIT2 with the dummy
    speaker port, so port 0x61 and the PIT's channel 2 answer from the kernel as Linux's
    calibration expects. ``irqchip=False`` is a bare machine: no APIC in CPUID, HLT exits.

    The controllers are created after the first memslot (:meth:`create_interrupt_controllers`,
    called by the first :meth:`create_vcpu`), not with the VM: on this host creating them
    starts an SRCU grace period that the next memslot change waits out (~7.5 ms), while a
    memslot registered before them lets that wait overlap the rest of the run and the VM's
    teardown, which waits for SRCU anyway (bench/lifecycle.py measures both orders' cost).
    The capabilities are checked here, before any memory exists.
    """

    name = "kvm"

    def __init__(self, kvm: Kvm | None = None, *, irqchip: bool = True) -> None:
        # First: without the kick handler a vCPU in KVM_RUN could never be stopped (and the
        # signal's default action would kill the process). ConfigError before any fd exists.
        ensure_kick_handler()
        self.kvm = kvm or Kvm()
        self._owns_kvm = kvm is None
        self.irqchip = irqchip
        try:
            self.vm: Vm = self.kvm.create_vm()
            # Three pages KVM needs for real mode on VMX hosts; inside the MMIO hole.
            self.vm.set_tss_addr()
            if irqchip:
                self._check_irqchip()
            self._irqchip_pending = irqchip
            self._supported_cpuid, self.max_vcpus = _system_facts(self.kvm)
            self._tsc_deadline = bool(irqchip and self.vm.check_extension(Cap.TSC_DEADLINE_TIMER))
        except BaseException:
            self.close()
            raise
        self._runners: list[KvmVcpuRunner] = []
        self._coalesced_zones: list[tuple[int, int]] = []
        self._ring: CoalescedRing | None = None

    def coalesce(self, zones: list[tuple[int, int]]) -> bool:
        """Register the port ranges ``zones`` ((base, length), from
        ``Bus.coalesce_ports``) as coalesced, before any vCPU exists. Where this KVM lacks
        KVM_CAP_COALESCED_PIO (or the vCPU mapping has no ring page) nothing changes and
        the answer is False."""
        vm = self.vm
        ring_end = (abi.KVM_COALESCED_MMIO_PAGE_OFFSET + 1) * abi.PAGE_SIZE
        if not zones or self._runners:
            return False
        if not (vm.check_extension(Cap.COALESCED_MMIO) and vm.check_extension(Cap.COALESCED_PIO)):
            return False
        if self.kvm.get_vcpu_mmap_size() < ring_end:
            return False
        for base, length in zones:
            vm.register_coalesced_zone(base, length, pio=True)
            self._coalesced_zones.append((base, length))
        return True

    def _check_irqchip(self) -> None:
        for cap in (Cap.IRQCHIP, Cap.PIT2):
            if not self.vm.check_extension(cap):
                raise Unavailable(
                    f"this KVM lacks KVM_CAP_{cap.name}, needed for the PC's interrupt controllers "
                    "(run with --irqchip off for a bare machine)",
                    cap.name,
                )

    def create_interrupt_controllers(self) -> None:
        """With ``irqchip``: KVM_CREATE_IRQCHIP and KVM_CREATE_PIT2, once (idempotent). KVM
        takes them only before the VM's first vCPU: :meth:`create_vcpu` calls this, and so
        must anyone creating vCPUs on ``self.vm`` directly (pre-population's helpers)."""
        if self._irqchip_pending:
            self._irqchip_pending = False
            self.vm.create_irqchip()
            self.vm.create_pit2(abi.KVM_PIT_SPEAKER_DUMMY)

    def check_xsave(self) -> str | None:
        """Before the vCPUs exist: hide XSAVE from them if this KVM does not see its
        guest's XSETBV (:mod:`vmm.backends.kvm_xsave`; Linux cannot boot on that CPUID).
        Returns a one-line notice when it did, else None."""
        if xsetbv_reaches_kvm(self.kvm, self._supported_cpuid):
            return None
        without_xsave(self._supported_cpuid)
        return (
            "this KVM does not see the guest's XSETBV (a KVM nested under QEMU's TCG?): "
            "XSAVE and AVX hidden from the guest, which saves its FPU with FXSAVE"
        )

    def interrupt_line(self, irq: int) -> Callable[[int], None] | None:
        """``set(level)`` for ISA interrupt ``irq`` of the in-kernel PIC and IOAPIC
        (KVM_IRQ_LINE, through KVM's default GSI routing); None without an irqchip."""
        if not self.irqchip:
            return None
        vm = self.vm
        return lambda level: vm.irq_line(irq, level)

    def idle_watch(self, runners: list[KvmVcpuRunner]) -> IdleWatch | None:
        """With the in-kernel irqchip HLT does not exit: a watch that tells when every vCPU
        has halted for good. None without it (HLT exits, and ends the loop, by itself)."""
        return IdleWatch(runners) if self.irqchip else None

    @property
    def memory(self) -> GuestMemory:
        return self.vm.memory

    def add_ram(self, gpa: int, size: int, backing: Backing) -> GuestRegion:
        return self.vm.add_memory(gpa, size, backing)

    def create_vcpu(self, index: int) -> KvmVcpuRunner:
        if index >= self.max_vcpus:
            raise ConfigError(f"this KVM supports at most {self.max_vcpus} vCPUs")
        self.create_interrupt_controllers()
        cpuid = cpuid_for_vcpu(self._supported_cpuid, index, irqchip=self.irqchip, tsc_deadline=self._tsc_deadline)
        vcpu = self.vm.create_vcpu(index)
        if self._coalesced_zones and self._ring is None:
            self._ring = CoalescedRing(vcpu.coalesced_ring())
        runner = KvmVcpuRunner(vcpu, cpuid, irqchip=self.irqchip, ring=self._ring)
        self._runners.append(runner)
        return runner

    def close(self) -> None:
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
        if self._owns_kvm:
            self.kvm.close()
