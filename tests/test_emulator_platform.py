"""The emulator's PC model on its own (no /dev/kvm): exceptions and ``int n`` delivered
through the guest's IVT/IDT in real, protected and long mode, escalation to #DF and
triple fault, MSRs (#GP for an unknown one, IA32_APIC_BASE), CPUID, and the parts it
does not model ending the run with a line naming them. The local APIC, IPIs and SMP are
in test_emulator_platform_apic.py, which uses the harness below.

Each test writes a few instructions (assembled with GNU as; bytes with the assembly
beside them) and the descriptor tables they need (built here), runs the vCPUs on a bus
with a recording device, and checks what the guest's handlers reported: the common
64-bit handler writes the vector its stub pushed and the CPU's frame, then CR2 and its
own RSP, to ports 0xe0 and 0xe4.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import replace

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn.x86_const import UC_X86_REG_RSP

from vmm.backends.base import HALTED, STOPPED, StopFlag, VcpuOutcome
from vmm.backends.emulator import EmulatorBackend, EmulatorVcpuRunner
from vmm.backends.emulator_env import Env
from vmm.backends.emulator_exceptions import Delivery, Event, Kind
from vmm.backends.emulator_state import apply_state
from vmm.backends.emulator_stubs import native_code
from vmm.cpu.layout import BootLayout, CpuMode, MiB
from vmm.cpu.state import CpuState, Segment, boot_state, write_system_tables
from vmm.devices.bus import Bus

pytestmark = pytest.mark.emulator

PORT, STOP_PORT = 0xE0, 0xF4
ENTRY, HANDLERS, COMMON = 0x100000, 0x110000, 0x111000
IDT, DATA = 0x6000, 0x200000
TSS = BootLayout.TSS
STACK = BootLayout.stack_top(0)  # 0xa0000
JOIN_SECONDS = 30.0

# The common 64-bit handler: 7 qwords from its RSP (vector, [error code], RIP, CS, RFLAGS,
# RSP, SS, ...) to port 0xe0 as 32-bit halves, then CR2 (both halves) and its RSP to 0xe4.
COMMON64 = bytes.fromhex(
    "4889e6"  # mov %rsp,%rsi
    "b907000000"  # mov $7,%ecx
    "48ad"  # 1: lods %ds:(%rsi),%rax
    "e7e0"  # out %eax,$0xe0
    "48c1e820"  # shr $32,%rax
    "e7e0"  # out %eax,$0xe0
    "e2f4"  # loop 1b
    "0f20d0"  # mov %cr2,%rax
    "e7e4"  # out %eax,$0xe4
    "48c1e820"  # shr $32,%rax
    "e7e4"  # out %eax,$0xe4
    "4889e0"  # mov %rsp,%rax
    "e7e4"  # out %eax,$0xe4
    "f4"  # hlt
)
# The common 32-bit handler: 6 dwords from ESP, then its EFLAGS and ESP; ends the run.
COMMON32 = bytes.fromhex(
    "89e6"  # mov %esp,%esi
    "b906000000"  # mov $6,%ecx
    "ad"  # 1: lods %ds:(%esi),%eax
    "e7e0"  # out %eax,$0xe0
    "e2fb"  # loop 1b
    "9c"  # pushf
    "58"  # pop %eax
    "e7e4"  # out %eax,$0xe4
    "89e0"  # mov %esp,%eax
    "e7e4"  # out %eax,$0xe4
    "e6f4"  # out %al,$0xf4            (the test's stop port)
)
DE64 = bytes.fromhex("31c9f7f1")  # xor %ecx,%ecx; div %ecx            (#DE at +2)
UD64 = bytes.fromhex("900f0b")  # nop; ud2                               (#UD at +1)
GP64 = bytes.fromhex(
    "66b85b00"  # mov $0x5b,%ax             (GDT index 11: beyond the limit)
    "8ed8"  # mov %ax,%ds                   (#GP(0x58) at +4)
)
PF64 = bytes.fromhex(
    "48b83412000001000000"  # movabs $0x100001234,%rax   (above the 4 GiB mapped)
    "c70001000000"  # movl $1,(%rax)                      (#PF(write) at +10)
)
INT40 = bytes.fromhex("cd40")  # int $0x40
INT41 = bytes.fromhex("cd41")  # int $0x41                  (its gate is not present)
INT80 = bytes.fromhex("cd80")  # int $0x80                  (the gate's DPL is 3)
INT81 = bytes.fromhex("cd81")  # int $0x81                  (the gate's DPL is 0)
INT3 = bytes.fromhex(
    "cc"  # int3
    "b042"  # mov $0x42,%al
    "e6e2"  # out %al,$0xe2
    "f4"  # hlt
)
RESUME64 = bytes.fromhex(
    "488b0424"  # mov (%rsp),%rax          (the saved RIP)
    "e7e0"  # out %eax,$0xe0
    "48cf"  # iretq
)
PUSH_PF64 = bytes.fromhex(
    "48bc00100000ff7f0000"  # movabs $0x7fff00001000,%rsp  (canonical, not mapped)
    "0f0b"  # ud2                                           (at +10)
)
WRMSR_BOGUS = bytes.fromhex("b9adde00000f30")  # mov $0xdead,%ecx; wrmsr      (at +5)
RDMSR_BOGUS = bytes.fromhex("b9785634120f32")  # mov $0x12345678,%ecx; rdmsr  (at +5)
LSTAR_ROUND_TRIP = bytes.fromhex(
    "b9820000c0"  # mov $0xc0000082,%ecx   (IA32_LSTAR: QEMU models it)
    "b878563412"  # mov $0x12345678,%eax
    "babc9a0000"  # mov $0x9abc,%edx
    "0f30"  # wrmsr
    "31c0"  # xor %eax,%eax
    "31d2"  # xor %edx,%edx
    "0f32"  # rdmsr
    "e7e0"  # out %eax,$0xe0
    "89d0"  # mov %edx,%eax
    "e7e0"  # out %eax,$0xe0
    "f4"  # hlt
)
# vCPU i reports IA32_APIC_BASE and CPUID.1 EBX, ECX, EDX on port 0xe0 (i = 0) or 0xe4.
APIC_BASE_CPUID = bytes.fromhex(
    "41b8e0000000"  # mov $0xe0,%r8d
    "85f6"  # test %esi,%esi              (RSI: the vCPU index)
    "7406"  # je 1f
    "41b8e4000000"  # mov $0xe4,%r8d
    "b91b000000"  # 1: mov $0x1b,%ecx      (IA32_APIC_BASE)
    "0f32"  # rdmsr
    "4189c1"  # mov %eax,%r9d
    "b801000000"  # mov $1,%eax
    "0fa2"  # cpuid
    "4189d2"  # mov %edx,%r10d
    "4489c2"  # mov %r8d,%edx
    "4489c8"  # mov %r9d,%eax
    "ef"  # out %eax,(%dx)
    "89d8"  # mov %ebx,%eax
    "ef"  # out %eax,(%dx)
    "89c8"  # mov %ecx,%eax
    "ef"  # out %eax,(%dx)
    "4489d0"  # mov %r10d,%eax
    "ef"  # out %eax,(%dx)
    "f4"  # hlt
)
X2APIC_MSR = bytes.fromhex("b9020800000f32f4")  # mov $0x802,%ecx; rdmsr; hlt
IOAPIC_READ = bytes.fromhex("b80000c0fe8b00f4")  # mov $0xfec00000,%eax; mov (%rax),%eax; hlt
PIT_WRITE = bytes.fromhex("b034e643f4")  # mov $0x34,%al; out %al,$0x43; hlt
REAL16 = bytes.fromhex(
    "fb"  # sti
    "cd21"  # int $0x21                     (IVT entry 0x21: 0000:7e00)
    "b055"  # mov $0x55,%al
    "e6e6"  # out %al,$0xe6
    "31c9"  # xor %cx,%cx
    "f7f1"  # div %cx                       (#DE at +9: IVT entry 0, 0000:7f00)
)
REAL16_INT21 = bytes.fromhex(
    "89e5"  # mov %sp,%bp
    "8b4600"  # mov 0(%bp),%ax              IP, CS and FLAGS from the frame
    "e7e0"  # out %ax,$0xe0
    "8b4602"  # mov 2(%bp),%ax
    "e7e0"  # out %ax,$0xe0
    "8b4604"  # mov 4(%bp),%ax
    "e7e0"  # out %ax,$0xe0
    "9c"  # pushf
    "58"  # pop %ax
    "e7e2"  # out %ax,$0xe2                 FLAGS in the handler
    "cf"  # iret
)
REAL16_DE = bytes.fromhex(
    "89e5"  # mov %sp,%bp
    "8b4600"  # mov 0(%bp),%ax
    "e7e4"  # out %ax,$0xe4
    "f4"  # hlt
)
INT80_32 = bytes.fromhex("cd80")  # int $0x80


class Recorder:
    """Ports 0xe0-0xe7: records (offset, bytes) of every write."""

    name = "recorder"

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.lock = threading.Lock()

    def write(self, offset: int, data: memoryview) -> None:
        with self.lock:
            self.writes.append((offset, bytes(data)))

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def values(self, offset: int) -> list[int]:
        with self.lock:
            return [int.from_bytes(d, "little") for o, d in self.writes if o == offset]


class Stopper:
    """Port 0xf4: the guest asks the test to stop every vCPU (as the exit port does)."""

    name = "stopper"

    def __init__(self, pc: Pc) -> None:
        self.pc = pc

    def write(self, offset: int, data: memoryview) -> None:
        self.pc.stop.requested = True
        for vcpu in self.pc.vcpus:
            vcpu.kick()

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))


def gate64(handler: int, *, dpl: int = 0, ist: int = 0, trap: bool = False, present: bool = True) -> bytes:
    """A 16-byte long-mode interrupt (or trap) gate to 0x08:handler."""
    low = (
        (handler & 0xFFFF)
        | 0x08 << 16
        | ist << 32
        | (0xF if trap else 0xE) << 40
        | dpl << 45
        | int(present) << 47
        | ((handler >> 16) & 0xFFFF) << 48
    )
    return struct.pack("<QQ", low, handler >> 32)


def gate32(handler: int, *, selector: int = 0x08, dpl: int = 0, trap: bool = False) -> bytes:
    """An 8-byte 32-bit interrupt (or trap) gate."""
    high = (handler & 0xFFFF0000) | 1 << 15 | dpl << 13 | (0xF if trap else 0xE) << 8
    return struct.pack("<II", (selector << 16) | (handler & 0xFFFF), high)


def stub(vector: int, at: int, common: int) -> bytes:
    """push $vector (imm32); jmp common: the same bytes in 32- and 64-bit code."""
    return b"\x68" + vector.to_bytes(4, "little") + b"\xe9" + (common - (at + 10)).to_bytes(4, "little", signed=True)


class Pc:
    """A backend with 16 MiB of RAM, the VMM's boot tables for ``mode``, ``code`` at the
    entry, a bus with the recorder and the stop port, and ``vcpus`` vCPUs: those in
    ``parked`` wait for INIT/SIPI, the others start at the entry with ``edit(state)``."""

    def __init__(
        self,
        backend: EmulatorBackend,
        mode: CpuMode,
        code: bytes,
        *,
        entry: int = ENTRY,
        vcpus: int = 1,
        parked: tuple[int, ...] = (),
        edit: Callable[[CpuState], CpuState] | None = None,
    ) -> None:
        self.backend = backend
        backend.add_ram(0, 16 * MiB, "anon")
        self.memory = backend.memory
        write_system_tables(self.memory, mode)
        self.memory.write(entry, code)
        self.recorder = Recorder()
        self.bus = Bus()
        self.bus.register_pio(PORT, 8, self.recorder)
        self.bus.register_pio(STOP_PORT, 1, Stopper(self))
        self.stop = StopFlag()
        self.vcpus: list[EmulatorVcpuRunner] = []
        for index in range(vcpus):
            vcpu = backend.create_vcpu(index)
            self.vcpus.append(vcpu)
            if index in parked:
                vcpu.park()
                continue
            state = replace(boot_state(mode, entry, index), idt=(IDT, 0xFFF))
            vcpu.set_state(edit(state) if edit is not None else state)

    def handlers64(self, *vectors: int, **gate: int | bool) -> None:
        """The common handler, a stub per vector and its gate (``gate``: gate64 options)."""
        self.memory.write(COMMON, COMMON64)
        for v in vectors:
            self.memory.write(HANDLERS + 16 * v, stub(v, HANDLERS + 16 * v, COMMON))
            self.memory.write(IDT + 16 * v, gate64(HANDLERS + 16 * v, **gate))  # type: ignore[arg-type]

    def run(self) -> VcpuOutcome:
        """vCPU 0's loop on this thread."""
        return self.vcpus[0].run_loop(self.bus, self.stop)

    def run_all(self) -> dict[int, VcpuOutcome]:
        """Every vCPU's loop on its own thread, joined (kicked if one does not finish)."""
        outcomes: dict[int, VcpuOutcome] = {}
        threads = [
            threading.Thread(target=lambda v=v: outcomes.setdefault(v.index, v.run_loop(self.bus, self.stop)))
            for v in self.vcpus
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_SECONDS)
        stuck = [i for i, t in enumerate(threads) if t.is_alive()]
        if stuck:
            self.stop.requested = True
            for v in self.vcpus:
                v.kick()
            for t in threads:
                t.join(JOIN_SECONDS)
        assert not stuck, f"vCPUs {stuck} did not finish"
        return outcomes

    def frame(self) -> list[int]:
        """The qwords the common 64-bit handler reported (port 0xe0, in halves)."""
        halves = self.recorder.values(0)
        return [lo | hi << 32 for lo, hi in zip(halves[::2], halves[1::2], strict=True)]


@pytest.fixture
def backend():
    with EmulatorBackend() as b:
        yield b


# --- long mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "vector", "error", "rip", "cr2"),
    [
        (DE64, 0, None, ENTRY + 2, 0),
        (UD64, 6, None, ENTRY + 1, 0),
        (GP64, 13, 0x58, ENTRY + 4, 0),
        (PF64, 14, 0x2, ENTRY + 10, 0x100001234),
        (INT40, 0x40, None, ENTRY + 2, 0),  # int n: RIP after it
        (INT41, 11, 0x41 * 8 + 2, ENTRY, 0),  # #NP for the gate; RIP at the int itself
    ],
    ids=["de", "ud", "gp", "pf", "int-n", "np-gate"],
)
def test_long_mode_exception_reaches_its_handler_with_the_cpu_frame(backend, code, vector, error, rip, cr2):
    pc = Pc(backend, CpuMode.LONG, code)
    pc.handlers64(vector, 0x40)
    pc.memory.write(IDT + 16 * 0x41, gate64(HANDLERS, present=False))
    assert pc.run() is HALTED  # the handler's hlt, IF clear
    pushed = [error] if error is not None else []
    head = [vector, *pushed, rip, 0x08]  # the stub's vector, the error code, RIP, CS
    frame = pc.frame()
    assert frame[: len(head)] == head
    rflags, rsp, ss = frame[len(head) : len(head) + 3]
    assert rflags & 0x202 == 0x2  # the guest's RFLAGS (fixed bit 1, IF clear)
    assert (rsp, ss) == (STACK, 0x10)  # same privilege: the interrupted RSP and SS
    cr2_lo, cr2_hi, handler_rsp = pc.recorder.values(4)
    assert cr2_lo | cr2_hi << 32 == cr2
    assert handler_rsp == STACK - 8 * (5 + len(pushed)) - 8  # the frame, then the stub's push


def test_int3_saves_the_next_rip_and_iretq_resumes_there(backend):
    pc = Pc(backend, CpuMode.LONG, INT3)
    pc.memory.write(HANDLERS, RESUME64)
    pc.memory.write(IDT + 16 * 3, gate64(HANDLERS))
    assert pc.run() is HALTED
    assert pc.recorder.values(0) == [ENTRY + 1]  # the saved RIP: after the int3
    assert pc.recorder.values(2) == [0x42]  # the code after it ran


def test_a_fault_while_delivering_a_contributory_fault_is_a_double_fault(backend):
    pc = Pc(backend, CpuMode.LONG, GP64)
    pc.handlers64(8)
    pc.memory.write(IDT + 16 * 13, gate64(HANDLERS, present=False))  # #GP -> #NP: contributory twice
    assert pc.run() is HALTED
    assert pc.frame()[:4] == [8, 0, ENTRY + 4, 0x08]  # #DF, error code 0, RIP of the mov


@pytest.mark.parametrize("idt_limit", [0xFFF, 0], ids=["df-gate-missing", "no-idt"])
def test_a_fault_that_cannot_reach_a_double_fault_handler_is_a_triple_fault(backend, idt_limit):
    pc = Pc(backend, CpuMode.LONG, GP64, edit=lambda s: replace(s, idt=(IDT, idt_limit)))
    pc.handlers64(0x40)  # no gate for #GP, #NP or #DF
    outcome = pc.run()
    assert outcome.kind == "crashed" and outcome.triple_fault
    assert outcome.detail == "triple fault (shutdown)"  # the words KVM's backend uses
    assert outcome.rip == ENTRY + 4
    assert pc.recorder.writes == []


def test_page_faults_pushing_a_frame_escalate_to_a_double_fault_on_its_ist_stack(backend):
    # #UD's frame cannot be pushed (#PF), nor #PF's on the same stack (#PF + #PF: #DF);
    # #DF's gate names IST1, a good stack.
    ist1 = 0x9F000
    pc = Pc(backend, CpuMode.LONG, PUSH_PF64)
    pc.handlers64(6, 14)
    pc.handlers64(8, ist=1)
    pc.memory.write_u64(TSS + 0x24, ist1)
    assert pc.run() is HALTED
    assert pc.frame()[:7] == [8, 0, ENTRY + 10, 0x08, pc.frame()[4], 0x7FFF00001000, 0x10]
    cr2_lo, cr2_hi, handler_rsp = pc.recorder.values(4)
    assert cr2_lo | cr2_hi << 32 == 0x7FFF00001000 - 8  # the first push that failed
    assert handler_rsp == ist1 - 6 * 8 - 8


def test_int_from_ring_3_switches_to_rsp0_aligned_down_to_16_bytes(backend):
    user_rsp, rsp0 = 0x80000, 0x9FFF8
    pc = Pc(backend, CpuMode.USER, INT80, edit=lambda s: replace(s, regs={**s.regs, "rsp": user_rsp}))
    pc.handlers64(0x80, dpl=3)
    pc.memory.write_u64(TSS + 4, rsp0)
    assert pc.run() is HALTED  # the handler runs at ring 0, where hlt works
    vector, rip, cs, rflags, rsp, ss = pc.frame()[:6]
    assert (vector, rip, cs, rsp, ss) == (0x80, ENTRY + 2, 0x2B, user_rsp, 0x23)
    assert rflags & 0x3000 == 0x3000  # the user's IOPL 3
    assert pc.recorder.values(4)[2] == (rsp0 & ~0xF) - 5 * 8 - 8


def test_int_through_a_gate_more_privileged_than_the_caller_is_gp(backend):
    pc = Pc(backend, CpuMode.USER, INT81, edit=lambda s: replace(s, regs={**s.regs, "rsp": 0x80000}))
    pc.handlers64(13)
    pc.memory.write(IDT + 16 * 0x81, gate64(HANDLERS))  # DPL 0
    assert pc.run() is HALTED
    frame = pc.frame()
    assert frame[:4] == [13, 0x81 * 8 + 2, ENTRY, 0x2B]  # the IDT entry as error code; RIP at the int
    assert frame[5:7] == [0x80000, 0x23]


@pytest.mark.parametrize(
    ("event", "pushed"),
    [
        (Event(17, Kind.FAULT, 0), [0]),  # #AC: unicorn's TCG never raises it
        (Event(8, Kind.FAULT, 0), [0]),  # #DF
        (Event(12, Kind.FAULT, 0x30), [0x30]),  # #SS
        (Event(13, Kind.EXTERNAL), []),  # an interrupt on vector 13 pushes no error code
        (Event(6, Kind.FAULT, 0x1234), []),  # nor does #UD, whatever the code says
    ],
    ids=["ac", "df", "ss", "interrupt-13", "ud"],
)
def test_delivery_pushes_an_error_code_for_exactly_the_vectors_that_have_one(backend, event, pushed):
    # The delivery code on an engine of its own, stopped at the entry with the boot state.
    pc = Pc(backend, CpuMode.LONG, b"")
    pc.handlers64(event.vector)
    region = pc.memory.region_at(0)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map_ptr(0, region.size, UC_PROT_ALL, region.host_addr)
    env = Env(native_code().capture_env(uc))
    apply_state(uc, env, replace(boot_state(CpuMode.LONG, ENTRY, 0), idt=(IDT, 0xFFF)))
    handler = Delivery(uc, env, pc.memory).deliver(event, ENTRY)
    assert handler == HANDLERS + 16 * event.vector
    rsp = uc.reg_read(UC_X86_REG_RSP)
    frame = [pc.memory.read_u64(rsp + 8 * i) for i in range(len(pushed) + 5)]
    assert frame == [*pushed, ENTRY, 0x08, 0x2, STACK, 0x10]
    assert rsp == STACK - 8 * len(frame)


# --- real mode ---------------------------------------------------------------------------------
def test_real_mode_int_and_faults_go_through_the_ivt(backend):
    pc = Pc(backend, CpuMode.REAL, REAL16, entry=0x7C00, edit=lambda s: replace(s, idt=(0, 0x3FF)))
    pc.memory.write(0x7E00, REAL16_INT21)
    pc.memory.write(0x7F00, REAL16_DE)
    pc.memory.write(0x21 * 4, struct.pack("<HH", 0x7E00, 0))  # IVT: offset, segment
    pc.memory.write(0, struct.pack("<HH", 0x7F00, 0))
    assert pc.run() is HALTED
    assert pc.recorder.values(0) == [0x7C03, 0, 0x202]  # IP after the int, CS, FLAGS (IF set)
    assert pc.recorder.values(2) == [0x2]  # IF and TF cleared in the handler
    assert pc.recorder.values(6) == [0x55]  # iret came back
    assert pc.recorder.values(4) == [0x7C09]  # #DE: the div's IP


# --- 32-bit protected mode ---------------------------------------------------------------------
CODE0 = Segment(selector=0x08, limit=0xFFFFFFFF, type=0xB, db=1, g=1)
DATA0 = Segment(selector=0x10, limit=0xFFFFFFFF, type=0x3, db=1, g=1)
CODE3 = Segment(selector=0x1B, limit=0xFFFFFFFF, type=0xB, dpl=3, db=1, g=1)
DATA3 = Segment(selector=0x23, limit=0xFFFFFFFF, type=0x3, dpl=3, db=1, g=1)
TSS32 = Segment(selector=0x28, base=TSS, limit=0x67, type=0xB, s=0)
ABSENT0 = Segment(selector=0x30, limit=0xFFFFFFFF, type=0x3, db=1, g=1, present=0)


def protected_ring3(backend: EmulatorBackend, code: bytes, ss0: int) -> Pc:
    """Ring-3 32-bit code with a GDT of ring-0 and ring-3 flat segments, a 32-bit TSS
    (SS0:ESP0 = ss0:0x9fff0) and 8-byte gates to the common 32-bit handler."""

    def ring3(state: CpuState) -> CpuState:
        regs = {**state.regs, "rsp": 0x80000, "rflags": 0x3202}  # IF and IOPL 3
        segments = {"cs": CODE3, "ds": DATA3, "es": DATA3, "fs": DATA3, "gs": DATA3, "ss": DATA3}
        return replace(state, regs=regs, tr=TSS32, gdt=(BootLayout.GDT, 0x37), idt=(IDT, 0x7FF), **segments)

    pc = Pc(backend, CpuMode.PROTECTED, code, edit=ring3)
    gdt = [0] + [s.descriptor() for s in (CODE0, DATA0, CODE3, DATA3, TSS32, ABSENT0)]
    pc.memory.write(BootLayout.GDT, struct.pack("<7Q", *gdt))
    pc.memory.write(TSS, struct.pack("<III", 0, 0x9FFF0, ss0))
    pc.memory.write(COMMON, COMMON32)
    return pc


@pytest.mark.parametrize("trap", [False, True], ids=["interrupt-gate", "trap-gate"])
def test_protected_mode_int_from_ring_3_switches_to_ss0_esp0(backend, trap):
    pc = protected_ring3(backend, INT80_32, ss0=0x10)
    pc.memory.write(HANDLERS, stub(0x80, HANDLERS, COMMON))
    pc.memory.write(IDT + 8 * 0x80, gate32(HANDLERS, dpl=3, trap=trap))
    assert pc.run() is STOPPED  # the handler wrote the stop port
    assert pc.recorder.values(0) == [0x80, ENTRY + 2, 0x1B, 0x3202, 0x80000, 0x23]
    eflags, esp = pc.recorder.values(4)
    assert bool(eflags & 0x200) is trap  # only an interrupt gate clears IF
    assert esp == 0x9FFF0 - 5 * 4 - 4


@pytest.mark.parametrize(("ss0", "vector", "error"), [(0, 10, 0), (0x30, 12, 0x30)], ids=["ts-null-ss0", "ss-absent"])
def test_protected_mode_bad_ring_0_stack_faults_naming_it(backend, ss0, vector, error):
    # The fault's gate leads to ring-3 code: delivered on the user's stack, no switch.
    pc = protected_ring3(backend, INT80_32, ss0=ss0)
    pc.memory.write(HANDLERS, stub(vector, HANDLERS, COMMON))
    pc.memory.write(IDT + 8 * 0x80, gate32(HANDLERS + 0x100, dpl=3))
    pc.memory.write(IDT + 8 * vector, gate32(HANDLERS, selector=0x1B))
    assert pc.run() is STOPPED
    # vector, error code (EXT clear: the event was int n), EIP of the int, CS, EFLAGS
    assert pc.recorder.values(0)[:5] == [vector, error, ENTRY, 0x1B, 0x3202]
    assert pc.recorder.values(4)[1] == 0x80000 - 4 * 4 - 4


# --- MSRs and CPUID ----------------------------------------------------------------------------
@pytest.mark.parametrize("code", [WRMSR_BOGUS, RDMSR_BOGUS], ids=["wrmsr", "rdmsr"])
def test_an_msr_no_cpu_has_raises_gp_through_the_idt(backend, code):
    pc = Pc(backend, CpuMode.LONG, code)
    pc.handlers64(13)
    assert pc.run() is HALTED
    assert pc.frame()[:4] == [13, 0, ENTRY + 5, 0x08]  # #GP(0) at the instruction


def test_msrs_qemu_models_keep_their_values(backend):
    pc = Pc(backend, CpuMode.LONG, LSTAR_ROUND_TRIP)
    assert pc.run() is HALTED
    assert pc.recorder.values(0) == [0x12345678, 0x9ABC]


def test_apic_base_and_cpuid_name_each_vcpu(backend):
    pc = Pc(backend, CpuMode.LONG, APIC_BASE_CPUID, vcpus=2)
    assert pc.run_all() == {0: HALTED, 1: HALTED}
    for port, (base, apic_id) in ((0, (0xFEE00900, 0)), (4, (0xFEE00800, 1))):
        got_base, ebx, ecx, edx = pc.recorder.values(port)
        assert got_base == base  # enabled, BSP bit on vCPU 0 only
        assert ebx >> 24 == apic_id
        assert ecx & 1 << 24 and not ecx & 1 << 21  # TSC-deadline timer, no x2APIC
        assert edx & 1 << 9  # an APIC


# --- what the emulator does not model ends the run, naming it ------------------------------------
@pytest.mark.parametrize(
    ("code", "named"),
    [(X2APIC_MSR, "x2APIC"), (IOAPIC_READ, "IOAPIC"), (PIT_WRITE, "PIT")],
    ids=["x2apic-msr", "ioapic", "pit"],
)
def test_an_unmodelled_device_ends_the_run_with_one_line(backend, code, named):
    pc = Pc(backend, CpuMode.LONG, code)
    outcome = pc.run()
    assert outcome.kind == "crashed" and not outcome.triple_fault
    assert named in outcome.detail and "\n" not in outcome.detail
