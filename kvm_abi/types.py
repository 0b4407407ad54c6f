"""Typed views of the cffi structs the public API hands out.

cffi's objects are ``Any`` to a type checker; these Protocols name the fields a caller may
read and write (cffi converts integer fields to ``int`` and arrays to indexable sequences),
so signatures such as ``Vcpu.get_regs() -> Regs`` tell a user's mypy what they hold. They
describe the layouts of :mod:`kvm_abi._cdefs` and add nothing at run time.
"""

from __future__ import annotations

from typing import Any, Protocol


class Regs(Protocol):
    """``struct kvm_regs``: the general registers."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int


class Segment(Protocol):
    """``struct kvm_segment``."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 (the kernel's name)
    g: int
    avl: int
    unusable: int


class DTable(Protocol):
    """``struct kvm_dtable`` (GDTR, IDTR)."""

    base: int
    limit: int


class IntArray(Protocol):
    """A fixed-size array of integers inside a struct."""

    def __getitem__(self, index: int) -> int: ...

    def __setitem__(self, index: int, value: int) -> None: ...

    def __len__(self) -> int: ...


class Sregs(Protocol):
    """``struct kvm_sregs``: segments, descriptor tables, control registers, EFER."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DTable
    idt: DTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: IntArray


class Fpu(Protocol):
    """``struct kvm_fpu`` (FXSAVE's layout: ``fpr[8][16]`` and ``xmm[16][16]`` are byte arrays)."""

    fpr: Any
    fcw: int
    fsw: int
    ftwx: int
    last_opcode: int
    last_ip: int
    last_dp: int
    xmm: Any
    mxcsr: int


class CpuidEntry(Protocol):
    """``struct kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class CpuidEntries(Protocol):
    """The ``entries[]`` of a ``struct kvm_cpuid2``."""

    def __getitem__(self, index: int) -> CpuidEntry: ...


class Cpuid2(Protocol):
    """``struct kvm_cpuid2``: ``nent`` entries."""

    nent: int
    entries: CpuidEntries


class PreFaultRange(Protocol):
    """``struct kvm_pre_fault_memory``: KVM advances ``gpa`` and shrinks ``size`` in place."""

    gpa: int
    size: int
    flags: int


class MemoryMapping(Protocol):
    """The RFC's ``struct kvm_memory_mapping`` (pages, not bytes)."""

    base_gfn: int
    nr_pages: int
    flags: int
    source: int
