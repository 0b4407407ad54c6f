"""The emulator backend on its own: CPU modes, port I/O (string I/O too), MMIO, faults,
kicks, several vCPUs, memory and lifetime. No /dev/kvm needed.

Each test builds a backend with RAM, the boot tables and a few hand-assembled
instructions (bytes with the assembly beside them), runs one vCPU loop on a bus
with a recording device, and checks what the devices saw and where the vCPU ended.
"""

from __future__ import annotations

import threading

import pytest

from vmm.backends.base import HALTED, STOPPED, StopFlag, VcpuOutcome
from vmm.backends.emulator import EmulatorBackend, EmulatorVcpuRunner
from vmm.backends.emulator_memory import mmio_ranges, scratch_page
from vmm.backends.emulator_state import describe_exception
from vmm.backends.emulator_turns import Turns
from vmm.cpu.layout import BootLayout, CpuMode, GiB, MiB
from vmm.cpu.state import REG_NAMES, boot_state, write_system_tables
from vmm.devices.bus import Bus
from vmm.errors import Unavailable, UnhandledAccess, VmmError
from vmm.memory import GuestMemory, GuestRegion, HostMemory

pytestmark = pytest.mark.emulator

PORT = 0xE0
ENTRY64 = 0x100000
JOIN_SECONDS = 30.0

REGS64 = bytes.fromhex(
    "49b98877665544332211"  # movabs $0x1122334455667788, %r9
    "4c89c8"  # mov %r9, %rax
    "e7e0"  # out %eax, $0xe0
    "48c1e820"  # shr $32, %rax
    "66e7e2"  # out %ax, $0xe2
    "f4"  # hlt
)
STRING64 = (
    bytes.fromhex(
        "488d3523000000"  # lea msg(%rip), %rsi     (msg: 0x23 bytes after this instruction)
        "b905000000"  # mov $5, %ecx
        "66bae100"  # mov $0xe1, %dx
        "fc"  # cld
        "f36e"  # rep outsb
        "bf00002000"  # mov $0x200000, %edi
        "b904000000"  # mov $4, %ecx
        "66bae400"  # mov $0xe4, %dx
        "f36c"  # rep insb
        "66ed"  # in %dx, %ax
        "89c3"  # mov %eax, %ebx
        "e5e4"  # in $0xe4, %eax
        "f4"  # hlt
    )
    + b"hello"
)
USER64 = bytes.fromhex(
    "668cc8"  # mov %cs, %ax
    "66e7e0"  # out %ax, $0xe0
    "668cd0"  # mov %ss, %ax
    "66e7e2"  # out %ax, $0xe2
    "9c"  # pushfq
    "58"  # pop %rax
    "e7e4"  # out %eax, $0xe4
    "f4"  # hlt: #GP at ring 3
)
UD64 = bytes.fromhex("900f0b")  # nop; ud2
PF64 = bytes.fromhex(
    "48b80000000002000000"  # movabs $0x200000000, %rax   (8 GiB: beyond the identity map)
    "488b18"  # mov (%rax), %rbx
)
DE64 = bytes.fromhex("31c9f7f1")  # xor %ecx, %ecx; div %ecx
MMIO64 = bytes.fromhex(
    "bb100000d0"  # mov $0xd0000010, %ebx
    "8b03"  # mov (%rbx), %eax
    "e7e0"  # out %eax, $0xe0
    "66c74304efbe"  # movw $0xbeef, 4(%rbx)
    "b900000008"  # mov $0x08000000, %ecx     (128 MiB: a gap below the hole)
    "8b11"  # mov (%rcx), %edx
    "89d0"  # mov %edx, %eax
    "e7e4"  # out %eax, $0xe4
    "f4"  # hlt
)
SPIN64 = bytes.fromhex("e6e0ebfe")  # out %al, $0xe0; 1: jmp 1b
XADD64 = bytes.fromhex(
    "b9400d0300"  # mov $200000, %ecx
    "b801000000"  # 1: mov $1, %eax
    "f00fc1042500002000"  # lock xadd %eax, 0x200000
    "ffc9"  # dec %ecx
    "75ee"  # jnz 1b
    "f4"  # hlt
)
WAIT64 = bytes.fromhex(
    "85f6"  # test %esi, %esi           (rsi: the vCPU index)
    "7511"  # jnz 2f
    "e6e0"  # out %al, $0xe0            vCPU 0: "running"
    "f390"  # 1: pause
    "833c250000200000"  # cmpl $0, 0x200000
    "74f4"  # je 1b                     ...until vCPU 1 sets the flag
    "e6e2"  # out %al, $0xe2
    "f4"  # hlt
    "c7042500002000"
    "01000000"  # 2: movl $1, 0x200000     vCPU 1: set the flag
    "f4"  # hlt
)
READ_32M = bytes.fromhex("b8000000028b00e7e0f4")  # mov $0x2000000,%eax; mov (%rax),%eax; out; hlt
PROT32 = bytes.fromhex(
    "b8efbeadde"  # mov $0xdeadbeef, %eax
    "e7e0"  # out %eax, $0xe0
    "668cc8"  # mov %cs, %ax
    "66e7e4"  # out %ax, $0xe4
    "f4"  # hlt
)
REAL16 = bytes.fromhex(
    "8cc8"  # mov %cs, %ax
    "e7e0"  # out %ax, $0xe0
    "e80000"  # call 1f
    "58"  # 1: pop %ax          (the IP of this instruction)
    "e7e2"  # out %ax, $0xe2
    "f4"  # hlt
)


class Recorder:
    """Ports 0xe0-0xe7: records (offset, bytes) of every write; reads return 1, 2, 3, ..."""

    name = "recorder"

    def __init__(self, on_write: threading.Event | None = None) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []
        self._next = 1
        self._on_write = on_write

    def write(self, offset: int, data: memoryview) -> None:
        self.writes.append((offset, bytes(data)))
        if self._on_write is not None:
            self._on_write.set()

    def read(self, offset: int, data: memoryview) -> None:
        self.reads.append((offset, len(data)))
        for i in range(len(data)):
            data[i] = self._next & 0xFF
            self._next += 1

    def values(self, offset: int) -> list[int]:
        return [int.from_bytes(d, "little") for o, d in self.writes if o == offset]


class Vm:
    """A backend with 16 MiB of RAM and one vCPU running ``code`` in ``mode``."""

    def __init__(
        self,
        backend: EmulatorBackend,
        mode: CpuMode,
        code: bytes,
        entry: int = ENTRY64,
        strict: bool = False,
        ram: int = 16 * MiB,
        vcpus: int = 1,
    ) -> None:
        self.backend = backend
        backend.add_ram(0, ram, "anon")
        write_system_tables(backend.memory, mode)
        backend.memory.write(entry, code)
        self.entry = entry
        self.recorder = Recorder()
        self.bus = Bus(strict=strict)
        self.bus.register_pio(PORT, 8, self.recorder)
        self.stop = StopFlag()
        self.vcpus = []
        for index in range(vcpus):
            vcpu = backend.create_vcpu(index)
            vcpu.set_state(boot_state(mode, entry, index))
            self.vcpus.append(vcpu)
        self.vcpu: EmulatorVcpuRunner = self.vcpus[0]

    def run(self) -> VcpuOutcome:
        return self.vcpu.run_loop(self.bus, self.stop)


@pytest.fixture
def backend():
    with EmulatorBackend() as b:
        yield b


# --- CPU modes ----------------------------------------------------------------------------
def test_long_mode_runs_64_bit_code_and_halts(backend):
    vm = Vm(backend, CpuMode.LONG, REGS64)
    assert vm.run() is HALTED
    assert vm.recorder.writes == [(0, bytes.fromhex("88776655")), (2, bytes.fromhex("4433"))]
    regs = vm.vcpu.regs()
    assert tuple(regs) == REG_NAMES
    assert regs["r9"] == 0x1122334455667788
    assert regs["rip"] == ENTRY64 + len(REGS64)  # after the hlt, as KVM reports it
    assert regs["rdi"] == BootLayout.BOOT_INFO and regs["rsp"] == BootLayout.stack_top(0)
    assert vm.vcpu.counts.io == 2 and vm.vcpu.counts.hlt == 1


def test_protected_mode_loads_the_flat_32_bit_code_segment(backend):
    vm = Vm(backend, CpuMode.PROTECTED, PROT32)
    assert vm.run() is HALTED
    assert vm.recorder.values(0) == [0xDEADBEEF]
    assert vm.recorder.values(4) == [0x18]  # CS as guests/README.md promises
    assert vm.vcpu.regs()["rip"] == ENTRY64 + len(PROT32)


def test_real_mode_reports_ip_not_cs_times_16_plus_ip(backend):
    entry = 0x12340  # CS 0x1000, IP 0x2340
    vm = Vm(backend, CpuMode.REAL, REAL16, entry=entry)
    assert vm.run() is HALTED
    assert vm.recorder.values(0) == [0x1000]  # CS
    assert vm.recorder.values(2) == [0x2340 + 7]  # IP of the pop: 16-bit offsets within CS
    assert vm.vcpu.regs()["rip"] == 0x2340 + len(REAL16)


def test_user_mode_runs_at_ring_3_with_iopl_3(backend):
    vm = Vm(backend, CpuMode.USER, USER64)
    outcome = vm.run()
    assert vm.recorder.values(0) == [0x2B]  # CS: ring 3 code
    assert vm.recorder.values(2) == [0x23]  # SS: ring 3 data
    (rflags,) = vm.recorder.values(4)
    assert rflags & 0x3000 == 0x3000  # IOPL 3: the out instructions above worked
    # hlt is privileged: at CPL 3 it raises #GP, as on hardware; with no IDT (limit
    # 0xffff over the zeroed IVT page: no valid gate) that escalates to a triple fault.
    assert outcome.kind == "crashed" and outcome.triple_fault
    assert outcome.detail == "triple fault (shutdown)"
    assert outcome.rip == ENTRY64 + len(USER64) - 1


# --- port I/O -------------------------------------------------------------------------------
def test_string_io_reaches_the_device_one_element_at_a_time(backend):
    vm = Vm(backend, CpuMode.LONG, STRING64)
    assert vm.run() is HALTED
    assert vm.recorder.writes == [(1, bytes([c])) for c in b"hello"]  # rep outsb: 5 one-byte writes
    assert backend.memory.read(0x200000, 4) == bytes([1, 2, 3, 4])  # rep insb filled guest RAM
    regs = vm.vcpu.regs()
    assert regs["rbx"] & 0xFFFF == 0x0605  # in %dx, %ax: one 2-byte read
    assert regs["rax"] & 0xFFFFFFFF == 0x0A090807  # in $0xe4, %eax: one 4-byte read
    assert vm.recorder.reads == [(4, 1)] * 4 + [(4, 2), (4, 4)]
    assert vm.vcpu.counts.io == 11


def test_unclaimed_port_reads_all_ones_and_strict_mode_raises(backend):
    code = bytes.fromhex("e570e7e0f4")  # in $0x70, %eax; out %eax, $0xe0; hlt
    vm = Vm(backend, CpuMode.LONG, code)
    assert vm.run() is HALTED
    assert vm.recorder.values(0) == [0xFFFFFFFF]
    with EmulatorBackend() as other:
        strict = Vm(other, CpuMode.LONG, code, strict=True)
        with pytest.raises(UnhandledAccess, match="0x70"):
            strict.run()
        assert strict.recorder.writes == []  # the out after the failed in never reached a device


def test_a_device_error_ends_the_loop_with_that_error(backend):
    vm = Vm(backend, CpuMode.LONG, REGS64)

    class Broken:
        name = "broken"

        def write(self, offset: int, data: memoryview) -> None:
            raise RuntimeError("device bug")

        def read(self, offset: int, data: memoryview) -> None:
            raise RuntimeError("device bug")

    vm.bus = Bus()
    vm.bus.register_pio(PORT, 8, Broken())
    with pytest.raises(RuntimeError, match="device bug"):
        vm.run()


# --- MMIO -------------------------------------------------------------------------------------
class MmioDevice:
    name = "mmio-dev"

    def __init__(self) -> None:
        self.log: list[tuple[str, int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(range(0x41, 0x41 + len(data)))
        self.log.append(("r", offset, bytes(data)))

    def write(self, offset: int, data: memoryview) -> None:
        self.log.append(("w", offset, bytes(data)))


def test_mmio_in_the_hole_reaches_a_device_and_gaps_read_all_ones(backend):
    vm = Vm(backend, CpuMode.LONG, MMIO64)
    device = MmioDevice()
    vm.bus.register_mmio(0xD0000000, 0x1000, device)
    assert vm.run() is HALTED
    assert device.log == [("r", 0x10, b"ABCD"), ("w", 0x14, bytes.fromhex("efbe"))]
    assert vm.recorder.values(0) == [0x44434241]
    assert vm.recorder.values(4) == [0xFFFFFFFF]  # 128 MiB: no RAM, no device
    assert vm.bus.unhandled == 1
    assert vm.vcpu.counts.mmio == 3


def test_unclaimed_mmio_under_strict_raises_before_the_next_instruction(backend):
    vm = Vm(backend, CpuMode.LONG, MMIO64, strict=True)
    with pytest.raises(UnhandledAccess, match="0xd0000010"):
        vm.run()
    assert vm.recorder.writes == []


# --- faults -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "short", "fault_at"),
    [(UD64, "#UD", 1), (DE64, "#DE", 2), (PF64, "#PF", 10)],
    ids=["invalid-opcode", "divide-error", "page-fault"],
)
def test_a_guest_exception_without_an_idt_is_a_triple_fault_at_the_instruction(backend, code, short, fault_at):
    # The boot state's IDT (base 0, limit 0xffff) covers the zeroed IVT page: the
    # exception's gate is not valid (#GP), neither is #GP's (#DF), nor #DF's: shutdown,
    # as KVM reports it, with RIP still at the faulting instruction.
    vm = Vm(backend, CpuMode.LONG, code)
    outcome = vm.run()
    assert outcome.kind == "crashed" and outcome.triple_fault, short
    assert outcome.detail == "triple fault (shutdown)"
    assert outcome.rip == ENTRY64 + fault_at
    assert vm.vcpu.counts.other == 1


def test_fetching_from_an_address_without_ram_crashes_naming_it(backend):
    code = bytes.fromhex("b8000000d0ffe0")  # mov $0xd0000000, %eax; jmp *%rax
    vm = Vm(backend, CpuMode.LONG, code)
    outcome = vm.run()
    assert outcome.kind == "crashed"  # KVM: an internal error (it cannot emulate the fetch)
    assert "instruction fetch" in outcome.detail and "0xd0000000" in outcome.detail
    assert outcome.rip == 0xD0000000


# --- kicks and time slices ----------------------------------------------------------------------
def test_kick_stops_a_spinning_vcpu(backend):
    vm = Vm(backend, CpuMode.LONG, SPIN64)
    running = threading.Event()
    vm.recorder._on_write = running
    result: list[VcpuOutcome] = []
    thread = threading.Thread(target=lambda: result.append(vm.run()), name="vcpu-0", daemon=True)
    thread.start()
    try:
        assert running.wait(JOIN_SECONDS), "the guest never reached its spin loop"
        vm.stop.requested = True
        vm.vcpu.kick()
    finally:
        thread.join(JOIN_SECONDS)
    assert not thread.is_alive()
    assert result == [STOPPED]


def test_a_stop_requested_before_the_loop_starts_is_honoured(backend):
    vm = Vm(backend, CpuMode.LONG, SPIN64)
    vm.stop.requested = True
    assert vm.run() is STOPPED
    assert vm.recorder.writes == []


# --- several vCPUs --------------------------------------------------------------------------------
def _run_threads(vm: Vm, vcpus: list[EmulatorVcpuRunner]) -> tuple[dict[int, VcpuOutcome], list[threading.Thread]]:
    outcomes: dict[int, VcpuOutcome] = {}
    threads = [
        threading.Thread(
            target=lambda v=v: outcomes.setdefault(v.index, v.run_loop(vm.bus, vm.stop)),
            name=f"vcpu-{v.index}",
            daemon=True,
        )
        for v in vcpus
    ]
    for t in threads:
        t.start()
    return outcomes, threads


def _join(vm: Vm, threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(JOIN_SECONDS)
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:  # end them before failing, so the backend can be closed
        vm.stop.requested = True
        for v in vm.vcpus:
            v.kick()
        for t in threads:
            t.join(JOIN_SECONDS)
    assert not stuck, f"{stuck} did not finish"


def test_vcpus_sharing_ram_see_atomic_lock_xadd_exactly_once(backend):
    vm = Vm(backend, CpuMode.LONG, XADD64, vcpus=3)
    outcomes, threads = _run_threads(vm, vm.vcpus)
    _join(vm, threads)
    assert outcomes == {0: HALTED, 1: HALTED, 2: HALTED}
    # Engines executing at once lose increments (unicorn's TCG makes lock xadd atomic only
    # within one engine), and a vCPU stopped from another thread repeats one on resume.
    # The vCPUs take turns and yield only at block boundaries: every increment lands once.
    assert backend.memory.read_u64(0x200000) == 3 * 200_000


def test_a_spinning_vcpu_yields_to_the_one_it_waits_for(backend):
    vm = Vm(backend, CpuMode.LONG, WAIT64, vcpus=2)
    spinning = threading.Event()
    vm.recorder._on_write = spinning
    outcomes, first = _run_threads(vm, vm.vcpus[:1])
    # vCPU 0 holds the turn and spins; vCPU 1 can only set the flag if vCPU 0 yields.
    started = spinning.wait(JOIN_SECONDS)
    more, second = _run_threads(vm, vm.vcpus[1:])
    _join(vm, first + second)
    assert started, "vCPU 0 never started"
    outcomes.update(more)
    assert outcomes == {0: HALTED, 1: HALTED}
    assert vm.recorder.writes == [(0, b"\x00"), (2, b"\x00")]
    assert vm.vcpus[0].counts.interrupted >= 1  # it gave its turn away at least once


class Member:
    def __init__(self) -> None:
        self.preempted = 0

    def preempt(self) -> None:
        self.preempted += 1


def test_turns_are_abandoned_on_stop_and_free_again_after_release():
    turns = Turns()
    a, b = Member(), Member()
    stop = StopFlag()
    assert turns.acquire(a, stop)
    stop.requested = True
    assert not turns.acquire(b, stop)  # a holds the turn; b gives up at once
    turns.release(a)
    stop.requested = False
    assert turns.acquire(b, stop)  # free again, and nobody left queued before b
    turns.release(b)


# --- memory and lifetime ----------------------------------------------------------------------------
def test_ram_added_after_the_vcpu_exists_is_visible_to_it(backend):
    vm = Vm(backend, CpuMode.LONG, READ_32M)
    backend.add_ram(32 * MiB, 1 * MiB, "memfd")
    backend.memory.write(32 * MiB, (0x5EED).to_bytes(4, "little"))
    assert vm.run() is HALTED
    assert vm.recorder.values(0) == [0x5EED]


def test_ram_above_4_gib_is_reachable_past_the_hole(backend):
    backend.add_ram(0, 16 * MiB, "anon")
    backend.add_ram(4 * GiB, 2 * MiB, "anon")
    write_system_tables(backend.memory, CpuMode.LONG)  # identity-maps up to 5 GiB now
    backend.memory.write(4 * GiB + 8, (0xC0FFEE).to_bytes(4, "little"))
    code = bytes.fromhex("48b808000000010000008b00e7e0f4")  # movabs $4G+8,%rax; mov (%rax),%eax; out; hlt
    backend.memory.write(ENTRY64, code)
    recorder, bus = Recorder(), Bus()
    bus.register_pio(PORT, 8, recorder)
    vcpu = backend.create_vcpu(0)
    vcpu.set_state(boot_state(CpuMode.LONG, ENTRY64, 0))
    assert vcpu.run_loop(bus, StopFlag()) is HALTED
    assert recorder.values(0) == [0xC0FFEE]


def test_mmio_ranges_cover_every_gap_below_the_identity_map():
    memory = GuestMemory()
    hosts = [HostMemory.allocate(16 * MiB, "anon")]
    try:
        memory.add(GuestRegion(0, 16 * MiB, hosts[0]))
        page = 4 * GiB - 4096
        assert scratch_page(memory) == page
        assert mmio_ranges(memory) == [(16 * MiB, page - 16 * MiB), (page, 4096)]
        hosts.append(HostMemory.allocate(2 * MiB, "anon"))
        memory.add(GuestRegion(4 * GiB + 1 * GiB, 2 * MiB, hosts[1]))  # RAM above 4 GiB leaves a gap
        assert mmio_ranges(memory)[-2:] == [(4 * GiB, 1 * GiB), (5 * GiB + 2 * MiB, 6 * GiB - 5 * GiB - 2 * MiB)]
    finally:
        for host in hosts:
            host.close()


def test_guest_memfd_is_refused_naming_it(backend):
    with pytest.raises(Unavailable, match="guest-memfd"):
        backend.add_ram(0, 16 * MiB, "guest-memfd")
    assert len(backend.memory) == 0


def test_close_is_idempotent_and_releases_ram():
    backend = EmulatorBackend()
    vm = Vm(backend, CpuMode.LONG, REGS64)
    host = backend.memory.find(0, 1)[0].host
    backend.close()
    assert host.closed
    assert vm.vcpu.closed
    backend.close()
    vm.vcpu.close()
    with pytest.raises(VmmError):
        vm.vcpu.regs()
    with pytest.raises(VmmError, match="closed"):
        backend.add_ram(0, 4096, "anon")


def test_exception_names():
    assert describe_exception(6) == "invalid opcode (#UD)"
    assert describe_exception(14) == "page fault (#PF)"
    assert describe_exception(0x80) == "interrupt 0x80"
