"""The emulator's local APICs on their own (no /dev/kvm): the timer in periodic, one-shot
and TSC-deadline mode, fixed IPIs between vCPUs, INIT/SIPI starting a parked
application processor, a parked one nobody starts, and HLT waiting for an interrupt.

Guests are hand-assembled (GNU as; bytes with the assembly beside them) and run on the
harness of test_emulator_platform.py. The timer handler (vector 0x20) counts at 0x200000
and sends EOI; it masks the timer at the tenth interrupt.
"""

from __future__ import annotations

import threading

import pytest
from test_emulator_platform import HANDLERS, IDT, JOIN_SECONDS, Pc, gate64

from vmm.backends.base import HALTED, NEVER_STARTED, STOPPED, VcpuOutcome
from vmm.backends.emulator import EmulatorBackend
from vmm.cpu.layout import CpuMode

pytestmark = pytest.mark.emulator

TICK = bytes.fromhex(
    "833c25000020000a"  # cmpl $10,0x200000
    "731b"  # jae 1f
    "ff042500002000"  # incl 0x200000
    "833c25000020000a"  # cmpl $10,0x200000
    "720a"  # jb 1f
    "c7832003000020000100"  # movl $0x10020,0x320(%rbx)    mask the timer (RBX: the APIC)
    "c783b000000000000000"  # 1: movl $0,0xb0(%rbx)        EOI
    "48cf"  # iretq
)
PERIODIC = bytes.fromhex(
    "bb0000e0fe"  # mov $0xfee00000,%ebx
    "c783f0000000ff010000"  # movl $0x1ff,0xf0(%rbx)          SVR: enabled
    "c783e00300000b000000"  # movl $0xb,0x3e0(%rbx)           divide by 1
    "c7832003000020000200"  # movl $0x20020,0x320(%rbx)       LVT timer: periodic, vector 0x20
    "c78380030000a0860100"  # movl $100000,0x380(%rbx)        initial count
    "fb"  # sti
    "f4"  # 1: hlt
    "833c25000020000a"  # cmpl $10,0x200000
    "72f5"  # jb 1b
    "8b042500002000"  # mov 0x200000,%eax
    "e7e0"  # out %eax,$0xe0
    "8b8320030000"  # mov 0x320(%rbx),%eax             LVT timer, masked by the handler
    "e7e4"  # out %eax,$0xe4
    "fa"  # cli
    "f4"  # hlt
)
ONE_SHOT = bytes.fromhex(
    "bb0000e0fe"  # mov $0xfee00000,%ebx
    "c783f0000000ff010000"  # movl $0x1ff,0xf0(%rbx)
    "c783e00300000b000000"  # movl $0xb,0x3e0(%rbx)
    "c7832003000020000000"  # movl $0x20,0x320(%rbx)          LVT timer: one-shot, vector 0x20
    "c7838003000050c30000"  # movl $50000,0x380(%rbx)
    "fb"  # sti
    "f4"  # 1: hlt
    "833c250000200001"  # cmpl $1,0x200000
    "72f5"  # jb 1b
    "0f31"  # rdtsc                                  then 3 M TSC cycles with IF set:
    "89c7"  # mov %eax,%edi                           a second interrupt would count
    "0f31"  # 2: rdtsc
    "29f8"  # sub %edi,%eax
    "3dc0c62d00"  # cmp $3000000,%eax
    "72f5"  # jb 2b
    "8b042500002000"  # mov 0x200000,%eax
    "e7e0"  # out %eax,$0xe0
    "8b8390030000"  # mov 0x390(%rbx),%eax             current count
    "e7e4"  # out %eax,$0xe4
    "fa"  # cli
    "f4"  # hlt
)
TSC_DEADLINE = bytes.fromhex(
    "b801000000"  # mov $1,%eax
    "0fa2"  # cpuid
    "89c8"  # mov %ecx,%eax
    "e7e4"  # out %eax,$0xe4                      CPUID.1:ECX
    "bb0000e0fe"  # mov $0xfee00000,%ebx
    "c783f0000000ff010000"  # movl $0x1ff,0xf0(%rbx)
    "c7832003000020000400"  # movl $0x40020,0x320(%rbx)       LVT timer: TSC-deadline, vector 0x20
    "0f31"  # rdtsc
    "48c1e220"  # shl $32,%rdx
    "4809d0"  # or %rdx,%rax
    "4805a0860100"  # add $100000,%rax
    "4889c2"  # mov %rax,%rdx
    "48c1ea20"  # shr $32,%rdx
    "b9e0060000"  # mov $0x6e0,%ecx               IA32_TSC_DEADLINE
    "0f30"  # wrmsr
    "fb"  # sti
    "f4"  # 1: hlt
    "833c250000200001"  # cmpl $1,0x200000
    "72f5"  # jb 1b
    "fa"  # cli
    "b9e0060000"  # mov $0x6e0,%ecx
    "0f32"  # rdmsr
    "e7e4"  # out %eax,$0xe4                      the deadline, after it fired
    "8b042500002000"  # mov 0x200000,%eax
    "e7e0"  # out %eax,$0xe0
    "f4"  # hlt
)
CURRENT_COUNT = bytes.fromhex(
    "bb0000e0fe"  # mov $0xfee00000,%ebx
    "c783f0000000ff010000"  # movl $0x1ff,0xf0(%rbx)
    "c783e00300000b000000"  # movl $0xb,0x3e0(%rbx)
    "c7832003000020000100"  # movl $0x10020,0x320(%rbx)       one-shot, masked
    "c7838003000000000010"  # movl $0x10000000,0x380(%rbx)
    "8b8390030000"  # mov 0x390(%rbx),%eax
    "e7e0"  # out %eax,$0xe0
    "0f31"  # rdtsc
    "89c7"  # mov %eax,%edi
    "0f31"  # 1: rdtsc
    "29f8"  # sub %edi,%eax
    "3d40420f00"  # cmp $1000000,%eax
    "72f5"  # jb 1b
    "8b8390030000"  # mov 0x390(%rbx),%eax
    "e7e0"  # out %eax,$0xe0
    "8b8380030000"  # mov 0x380(%rbx),%eax             initial count
    "e7e4"  # out %eax,$0xe4
    "8b4330"  # mov 0x30(%rbx),%eax               version
    "e7e4"  # out %eax,$0xe4
    "8b4320"  # mov 0x20(%rbx),%eax               ID
    "e7e4"  # out %eax,$0xe4
    "fa"  # cli
    "f4"  # hlt
)
# vCPU 0 waits for vCPU 1 to be ready, sends it vector 0x30 and waits for its handler.
IPI = bytes.fromhex(
    "bb0000e0fe"  # mov $0xfee00000,%ebx
    "c783f0000000ff010000"  # movl $0x1ff,0xf0(%rbx)
    "85f6"  # test %esi,%esi                     (RSI: the vCPU index)
    "752e"  # jne 3f
    "f390"  # 1: pause
    "833c250000200001"  # cmpl $1,0x200000
    "75f4"  # jne 1b
    "c7831003000000000001"  # movl $0x1000000,0x310(%rbx)     ICR high: APIC ID 1
    "c7830003000030000000"  # movl $0x30,0x300(%rbx)          ICR low: fixed, vector 0x30
    "f390"  # 2: pause
    "833c250000200002"  # cmpl $2,0x200000
    "75f4"  # jne 2b
    "fa"  # cli
    "f4"  # hlt
    "c704250000200001000000"  # 3: movl $1,0x200000      vCPU 1: ready
    "fb"  # sti
    "f4"  # 4: hlt
    "ebfd"  # jmp 4b
)
IPI_HANDLER = bytes.fromhex(
    "8b4320"  # mov 0x20(%rbx),%eax               own APIC ID
    "e7e0"  # out %eax,$0xe0
    "8b8310010000"  # mov 0x110(%rbx),%eax             ISR bits 32-63 (vector 0x30: bit 16)
    "e7e4"  # out %eax,$0xe4
    "c783b000000000000000"  # movl $0,0xb0(%rbx)           EOI
    "8b8310010000"  # mov 0x110(%rbx),%eax
    "e7e4"  # out %eax,$0xe4
    "c704250000200002000000"  # movl $2,0x200000
    "fa"  # cli
    "f4"  # hlt
)
# vCPU 0 starts the parked vCPU 1: INIT, STARTUP (vector 8: 0x8000), STARTUP again.
INIT_SIPI_SIPI = bytes.fromhex(
    "bb0000e0fe"  # mov $0xfee00000,%ebx
    "c783f0000000ff010000"  # movl $0x1ff,0xf0(%rbx)
    "c7831003000000000001"  # movl $0x1000000,0x310(%rbx)
    "c7830003000000450000"  # movl $0x4500,0x300(%rbx)        INIT
    "c7831003000000000001"  # movl $0x1000000,0x310(%rbx)
    "c7830003000008460000"  # movl $0x4608,0x300(%rbx)        STARTUP, vector 8
    "c7831003000000000001"  # movl $0x1000000,0x310(%rbx)
    "c7830003000008460000"  # movl $0x4608,0x300(%rbx)        STARTUP again: ignored
    "f390"  # 1: pause
    "66833c250070000000"  # cmpw $0,0x7000
    "74f3"  # je 1b
    "fa"  # cli
    "f4"  # hlt
)
TRAMPOLINE = bytes.fromhex(  # real mode at 0x800:0
    "8cc8"  # mov %cs,%ax
    "e7e2"  # out %ax,$0xe2
    "31c0"  # xor %ax,%ax
    "8ed8"  # mov %ax,%ds
    "f0ff060070"  # lock incw 0x7000                 check in
    "fa"  # cli
    "f4"  # hlt
)
# vCPU 0 starts vCPU 1 at 0x8000 (it checks in, then spins), INITs it again and starts it
# at 0x9000 (it checks in there and halts).
REINIT = bytes.fromhex(
    "bb0000e0fe"  # mov $0xfee00000,%ebx
    "c783f0000000ff010000"  # movl $0x1ff,0xf0(%rbx)
    "c7831003000000000001"  # movl $0x1000000,0x310(%rbx)
    "c7830003000000450000"  # movl $0x4500,0x300(%rbx)        INIT
    "c7831003000000000001"  # movl $0x1000000,0x310(%rbx)
    "c7830003000008460000"  # movl $0x4608,0x300(%rbx)        STARTUP, vector 8
    "f390"  # 1: pause
    "66833c250070000000"  # cmpw $0,0x7000
    "74f3"  # je 1b
    "c7831003000000000001"  # movl $0x1000000,0x310(%rbx)
    "c7830003000000450000"  # movl $0x4500,0x300(%rbx)        INIT: vCPU 1 is running
    "c7831003000000000001"  # movl $0x1000000,0x310(%rbx)
    "c7830003000009460000"  # movl $0x4609,0x300(%rbx)        STARTUP, vector 9
    "f390"  # 2: pause
    "66833c250270000000"  # cmpw $0,0x7002
    "74f3"  # je 2b
    "fa"  # cli
    "f4"  # hlt
)
SPIN_AP = bytes.fromhex(  # real mode at 0x800:0
    "31c0"  # xor %ax,%ax
    "8ed8"  # mov %ax,%ds
    "c70600700100"  # movw $1,0x7000
    "ebfe"  # 1: jmp 1b
)
SECOND_AP = bytes.fromhex(  # real mode at 0x900:0
    "31c0"  # xor %ax,%ax
    "8ed8"  # mov %ax,%ds
    "c70602700100"  # movw $1,0x7002
    "fa"  # cli
    "f4"  # hlt
)
HALT = bytes.fromhex("faf4")  # cli; hlt
WAIT = bytes.fromhex("fbf4")  # sti; hlt


@pytest.fixture
def backend():
    with EmulatorBackend() as b:
        yield b


def timer_pc(backend: EmulatorBackend, code: bytes) -> Pc:
    pc = Pc(backend, CpuMode.LONG, code)
    pc.memory.write(HANDLERS, TICK)
    pc.memory.write(IDT + 16 * 0x20, gate64(HANDLERS))
    return pc


# --- the timer ---------------------------------------------------------------------------------
def test_periodic_timer_interrupts_until_the_handler_masks_it(backend):
    pc = timer_pc(backend, PERIODIC)
    assert pc.run() is HALTED
    assert pc.recorder.values(0) == [10]  # ten interrupts, each acknowledged with EOI
    assert pc.recorder.values(4) == [0x10020]  # masked, still periodic mode and vector 0x20


def test_one_shot_timer_interrupts_once_and_its_count_stays_zero(backend):
    pc = timer_pc(backend, ONE_SHOT)
    assert pc.run() is HALTED
    assert pc.recorder.values(0) == [1]
    assert pc.recorder.values(4) == [0]


def test_tsc_deadline_timer_interrupts_once_and_clears_the_msr(backend):
    pc = timer_pc(backend, TSC_DEADLINE)
    assert pc.run() is HALTED
    cpuid_ecx, deadline = pc.recorder.values(4)
    assert cpuid_ecx & 1 << 24  # the mode is offered
    assert deadline == 0
    assert pc.recorder.values(0) == [1]


def test_current_count_decreases_from_the_initial_count(backend):
    pc = Pc(backend, CpuMode.LONG, CURRENT_COUNT)
    assert pc.run() is HALTED
    first, later = pc.recorder.values(0)
    assert 0x10000000 >= first > later > 0
    assert pc.recorder.values(4) == [0x10000000, 0x50014, 0]  # initial count, version, ID


def test_hlt_with_interrupts_enabled_waits_until_kicked(backend):
    pc = Pc(backend, CpuMode.LONG, WAIT)
    result: list[VcpuOutcome] = []
    thread = threading.Thread(target=lambda: result.append(pc.run()), daemon=True)
    thread.start()
    slot = backend.platform.slots[0]
    waited = threading.Event()
    for _ in range(3000):  # until its loop sits in the HLT wait (nothing can wake it)
        if slot.state == "halted":
            waited.set()
            break
        thread.join(0.01)
    pc.stop.requested = True
    pc.vcpus[0].kick()
    thread.join(JOIN_SECONDS)
    assert waited.is_set() and not thread.is_alive()
    assert result == [STOPPED]


# --- several vCPUs -----------------------------------------------------------------------------
def test_fixed_ipi_reaches_the_other_vcpus_handler(backend):
    pc = Pc(backend, CpuMode.LONG, IPI, vcpus=2)
    pc.memory.write(HANDLERS, IPI_HANDLER)
    pc.memory.write(IDT + 16 * 0x30, gate64(HANDLERS))
    assert pc.run_all() == {0: HALTED, 1: HALTED}
    assert pc.recorder.values(0) == [1 << 24]  # vCPU 1's APIC took it
    assert pc.recorder.values(4) == [1 << 16, 0]  # in service until EOI


def test_init_sipi_sipi_starts_a_parked_ap_once_in_real_mode(backend):
    pc = Pc(backend, CpuMode.LONG, INIT_SIPI_SIPI, vcpus=2, parked=(1,))
    pc.memory.write(0x8000, TRAMPOLINE)
    assert pc.run_all() == {0: HALTED, 1: HALTED}
    assert pc.recorder.values(2) == [0x800]  # CS = vector << 8, IP 0
    assert int.from_bytes(pc.memory.read(0x7000, 2), "little") == 1  # the second SIPI was ignored


def test_init_resets_a_running_ap_to_wait_for_sipi(backend):
    pc = Pc(backend, CpuMode.LONG, REINIT, vcpus=2, parked=(1,))
    pc.memory.write(0x8000, SPIN_AP)
    pc.memory.write(0x9000, SECOND_AP)
    assert pc.run_all() == {0: HALTED, 1: HALTED}
    assert pc.vcpus[1].regs()["rip"] == len(SECOND_AP)  # it halted in the second trampoline


def test_a_parked_ap_nobody_starts_returns_once_the_others_halted(backend):
    pc = Pc(backend, CpuMode.LONG, HALT, vcpus=2, parked=(1,))
    assert pc.run_all() == {0: HALTED, 1: NEVER_STARTED}
    assert NEVER_STARTED.kind == "halted"  # so "all vCPUs halted" still ends a run


def test_a_parked_ap_stops_when_kicked(backend):
    pc = Pc(backend, CpuMode.LONG, HALT, vcpus=2, parked=(1,))
    result: list[VcpuOutcome] = []
    # vCPU 0 is ready but never runs: the AP could still be started, so it waits.
    thread = threading.Thread(target=lambda: result.append(pc.vcpus[1].run_loop(pc.bus, pc.stop)), daemon=True)
    thread.start()
    slot = backend.platform.slots[1]
    thread.join(0.05)
    assert thread.is_alive() and slot.state == "parked"
    pc.vcpus[1].kick()
    thread.join(JOIN_SECONDS)
    assert result == [STOPPED]
