"""kvm_abi against the verified tables (kvm-abi.md §1, §6-§8, §9-A) and the C compiler."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import kvm_abi as abi
from kvm_abi import Cap, ExitReason, GuestMemfdFlag, MemFlag, MemoryMappingFlag, VmType, ffi
from kvm_abi.ioc import IOC_NONE, IOC_READ, IOC_WRITE, ioc

SIZES = {
    "struct kvm_pre_fault_memory": 64,
    "struct kvm_create_guest_memfd": 64,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_userspace_memory_region2": 160,
    "struct kvm_memory_attributes": 32,
    "struct kvm_memory_mapping": 32,
    "struct kvm_regs": 144,
    "struct kvm_sregs": 312,
    "struct kvm_segment": 24,
    "struct kvm_dtable": 16,
    "struct kvm_fpu": 416,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_cpuid2": 8,
    "struct kvm_msr_entry": 16,
    "struct kvm_msrs": 8,
    "struct kvm_msr_list": 4,
    "struct kvm_guest_debug": 72,
    "struct kvm_debug_exit_arch": 32,
    "struct kvm_pit_config": 64,
    "struct kvm_irq_level": 8,
    "struct kvm_dirty_log": 16,
    "struct kvm_mp_state": 4,
    "struct kvm_translation": 24,
    "struct kvm_enable_cap": 104,
    "struct kvm_msi": 32,
    "struct kvm_coalesced_mmio_zone": 16,
    "struct kvm_coalesced_mmio": 24,
    "struct kvm_coalesced_mmio_ring": 8,
    "struct kvm_run": 2352,
}

OFFSETS = [
    ("struct kvm_userspace_memory_region2", "guest_memfd_offset", 32),
    ("struct kvm_userspace_memory_region2", "guest_memfd", 40),
    ("struct kvm_userspace_memory_region2", "pad2", 48),
    ("struct kvm_run", "immediate_exit", 1),
    ("struct kvm_run", "exit_reason", 8),
    ("struct kvm_run", "flags", 14),
    ("struct kvm_run", "cr8", 16),
    ("struct kvm_run", "io", 32),
    ("struct kvm_run", "kvm_valid_regs", 288),
    ("struct kvm_run", "s", 304),
    ("struct kvm_sregs", "tr", 144),
    ("struct kvm_sregs", "gdt", 192),
    ("struct kvm_sregs", "cr0", 224),
    ("struct kvm_sregs", "efer", 264),
    ("struct kvm_sregs", "apic_base", 272),
    ("struct kvm_sregs", "interrupt_bitmap", 280),
    ("struct kvm_regs", "rip", 128),
    ("struct kvm_regs", "rflags", 136),
    ("struct kvm_segment", "selector", 12),
    ("struct kvm_segment", "type", 14),
    ("struct kvm_segment", "unusable", 22),
    ("struct kvm_cpuid_entry2", "flags", 8),
    ("struct kvm_cpuid_entry2", "eax", 12),
    ("struct kvm_cpuid2", "entries", 8),
    ("struct kvm_msrs", "entries", 8),
    ("struct kvm_pre_fault_memory", "flags", 16),
    ("struct kvm_pre_fault_memory", "padding", 24),
    ("struct kvm_create_guest_memfd", "reserved", 16),
    ("struct kvm_memory_mapping", "source", 24),
]

# Offsets of union members inside kvm_run (kvm-abi.md §7), from the start of kvm_run.
RUN_MEMBERS = [
    ("io", "direction", 32),
    ("io", "size", 33),
    ("io", "port", 34),
    ("io", "count", 36),
    ("io", "data_offset", 40),
    ("mmio", "phys_addr", 32),
    ("mmio", "data", 40),
    ("mmio", "len", 48),
    ("mmio", "is_write", 52),
    ("hypercall", "nr", 32),
    ("hypercall", "args", 40),
    ("hypercall", "ret", 88),
    ("hypercall", "flags", 96),
    ("internal", "suberror", 32),
    ("internal", "ndata", 36),
    ("internal", "data", 40),
    ("emulation_failure", "flags", 40),
    ("emulation_failure", "insn_size", 48),
    ("emulation_failure", "insn_bytes", 49),
    ("fail_entry", "hardware_entry_failure_reason", 32),
    ("fail_entry", "cpu", 40),
    ("system_event", "type", 32),
    ("system_event", "ndata", 36),
    ("system_event", "data", 40),
    ("memory_fault", "flags", 32),
    ("memory_fault", "gpa", 40),
    ("memory_fault", "size", 48),
    ("msr", "error", 32),
    ("msr", "reason", 40),
    ("msr", "index", 44),
    ("msr", "data", 48),
]

IOCTL_NUMBERS = {
    "KVM_GET_API_VERSION": 0x0000AE00,
    "KVM_CREATE_VM": 0x0000AE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0x0000AE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0x0000AE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_GET_EMULATED_CPUID": 0xC008AE09,
    "KVM_GET_MSR_FEATURE_INDEX_LIST": 0xC004AE0A,
    "KVM_CREATE_VCPU": 0x0000AE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0x0000AE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_CREATE_IRQCHIP": 0x0000AE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_SIGNAL_MSI": 0x4020AEA5,
    "KVM_REGISTER_COALESCED_MMIO": 0x4010AE67,
    "KVM_UNREGISTER_COALESCED_MMIO": 0x4010AE68,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_RUN": 0x0000AE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_SET_GUEST_DEBUG": 0x4048AE9B,
    "KVM_PRE_FAULT_MEMORY": 0xC040AED5,
    "KVM_MAP_MEMORY": 0xC020AED5,  # the RFC v1 number (32-byte struct kvm_memory_mapping)
}

CAPS = {
    "IRQCHIP": 0,
    "HLT": 1,
    "USER_MEMORY": 3,
    "SET_TSS_ADDR": 4,
    "EXT_CPUID": 7,
    "NR_VCPUS": 9,
    "NR_MEMSLOTS": 10,
    "PIT": 11,
    "MP_STATE": 14,
    "COALESCED_MMIO": 15,
    "SYNC_MMU": 16,
    "USER_NMI": 22,
    "SET_GUEST_DEBUG": 23,
    "REINJECT_CONTROL": 24,
    "IRQ_ROUTING": 25,
    "IRQFD": 32,
    "PIT2": 33,
    "PIT_STATE2": 35,
    "IOEVENTFD": 36,
    "SET_IDENTITY_MAP_ADDR": 37,
    "ADJUST_CLOCK": 39,
    "INTERNAL_ERROR_DATA": 40,
    "VCPU_EVENTS": 41,
    "DEBUGREGS": 50,
    "ENABLE_CAP": 54,
    "XSAVE": 55,
    "XCRS": 56,
    "TSC_CONTROL": 60,
    "GET_TSC_KHZ": 61,
    "MAX_VCPUS": 66,
    "TSC_DEADLINE_TIMER": 72,
    "READONLY_MEM": 81,
    "ENABLE_CAP_VM": 98,
    "CHECK_EXTENSION_VM": 105,
    "SPLIT_IRQCHIP": 121,
    "MAX_VCPU_ID": 128,
    "X2APIC_API": 129,
    "IMMEDIATE_EXIT": 136,
    "X86_DISABLE_EXITS": 143,
    "COALESCED_PIO": 162,
    "MANUAL_DIRTY_LOG_PROTECT2": 168,
    "X86_USER_SPACE_MSR": 188,
    "X86_MSR_FILTER": 189,
    "DIRTY_LOG_RING": 192,
    "BINARY_STATS_FD": 203,
    "XSAVE2": 208,
    "SYSTEM_EVENT_DATA": 215,
    "X86_NOTIFY_VMEXIT": 219,
    "USER_MEMORY2": 231,
    "MEMORY_FAULT_INFO": 232,
    "MEMORY_ATTRIBUTES": 233,
    "GUEST_MEMFD": 234,
    "VM_TYPES": 235,
    "PRE_FAULT_MEMORY": 236,
    "X86_APIC_BUS_CYCLES_NS": 237,
    "X86_GUEST_MODE": 238,
    "ARM_WRITABLE_IMP_ID_REGS": 239,
    "ARM_EL2": 240,
    "ARM_EL2_E2H0": 241,
    "RISCV_MP_STATE_RESET": 242,
    "ARM_CACHEABLE_PFNMAP_SUPPORTED": 243,
    "GUEST_MEMFD_FLAGS": 244,
}

EXITS = [
    "UNKNOWN",
    "EXCEPTION",
    "IO",
    "HYPERCALL",
    "DEBUG",
    "HLT",
    "MMIO",
    "IRQ_WINDOW_OPEN",
    "SHUTDOWN",
    "FAIL_ENTRY",
    "INTR",
    "SET_TPR",
    "TPR_ACCESS",
    "S390_SIEIC",
    "S390_RESET",
    "DCR",
    "NMI",
    "INTERNAL_ERROR",
    "OSI",
    "PAPR_HCALL",
    "S390_UCONTROL",
    "WATCHDOG",
    "S390_TSCH",
    "EPR",
    "SYSTEM_EVENT",
    "S390_STSI",
    "IOAPIC_EOI",
    "HYPERV",
    "ARM_NISV",
    "X86_RDMSR",
    "X86_WRMSR",
    "DIRTY_RING_FULL",
    "AP_RESET_HOLD",
    "X86_BUS_LOCK",
    "XEN",
    "RISCV_SBI",
    "RISCV_CSR",
    "NOTIFY",
    "LOONGARCH_IOCSR",
    "MEMORY_FAULT",
    "TDX",
    "ARM_SEA",
]


@pytest.mark.parametrize(("ctype", "size"), SIZES.items())
def test_struct_sizes(ctype, size):
    assert ffi.sizeof(ctype) == size


@pytest.mark.parametrize(("ctype", "field", "offset"), OFFSETS)
def test_field_offsets(ctype, field, offset):
    assert ffi.offsetof(ctype, field) == offset


@pytest.mark.parametrize(("member", "field", "offset"), RUN_MEMBERS)
def test_kvm_run_union_members(member, field, offset):
    run = ffi.new("struct kvm_run *")
    base = int(ffi.cast("uintptr_t", run))
    addr = int(ffi.cast("uintptr_t", ffi.addressof(getattr(run, member), field)))
    assert addr - base == offset


def test_exit_union_is_256_bytes():
    assert ffi.offsetof("struct kvm_run", "kvm_valid_regs") - ffi.offsetof("struct kvm_run", "io") == 256


@pytest.mark.parametrize(("name", "number"), IOCTL_NUMBERS.items())
def test_ioctl_numbers(name, number):
    op = getattr(abi, name)
    assert op.name == name
    assert op.number == number, f"{name}: {op.number:#x} != {number:#x}"


def test_ioctl_size_field_matches_the_argument_struct():
    for op in abi.ALL_IOCTLS:
        encoded = (op.number >> 16) & 0x3FFF
        assert encoded == (ffi.sizeof(op.argtype) if op.argtype else 0), op.name


def test_ioc_encoder_matches_the_kernel_macros():
    # _IOWR(0xAE, 0xd5, 64) and friends, by the asm-generic formula
    assert ioc(IOC_READ | IOC_WRITE, 0xD5, 64) == 0xC040AED5
    assert ioc(IOC_WRITE, 0x49, 160) == 0x40A0AE49
    assert ioc(IOC_READ, 0x81, 144) == 0x8090AE81
    assert ioc(IOC_NONE, 0x80, 0) == 0xAE80
    assert ioc(IOC_READ | IOC_WRITE, 0xD5, 24) == 0xC018AED5  # RFC v2 KVM_MAP_MEMORY
    with pytest.raises(ValueError):
        ioc(IOC_READ, 1, 1 << 14)


def test_ioctl_names_are_unique_and_complete():
    names = [op.name for op in abi.ALL_IOCTLS]
    assert len(names) == len(set(names))
    assert set(IOCTL_NUMBERS) <= set(names)


@pytest.mark.parametrize(("name", "value"), CAPS.items())
def test_capability_numbers(name, value):
    assert Cap[name] == value


def test_exit_reasons_are_numbered_in_order():
    assert [e.name for e in sorted(ExitReason)] == EXITS
    assert [int(e) for e in sorted(ExitReason)] == list(range(len(EXITS)))


def test_flag_and_type_constants():
    assert [int(t) for t in VmType] == [0, 1, 2, 3, 4, 5]
    assert (MemFlag.LOG_DIRTY_PAGES, MemFlag.READONLY, MemFlag.GUEST_MEMFD) == (1, 2, 4)
    assert (GuestMemfdFlag.MMAP, GuestMemfdFlag.INIT_SHARED) == (1, 2)
    assert abi.KVM_MEMORY_ATTRIBUTE_PRIVATE == 8
    assert abi.KVM_MEMORY_EXIT_FLAG_PRIVATE == 8
    assert [int(f) for f in MemoryMappingFlag] == [1, 2, 4, 8]
    assert (abi.KVM_EXIT_IO_IN, abi.KVM_EXIT_IO_OUT) == (0, 1)
    assert abi.KVM_API_VERSION == 12
    assert (abi.MADV_POPULATE_READ, abi.MADV_POPULATE_WRITE, abi.MADV_HUGEPAGE) == (22, 23, 14)
    assert abi.PAGE_SIZE == 4096
    assert abi.PIO_DATA_OFFSET == 4096  # kvm-abi.md §9-E: io.data_offset of every port exit here


def test_errno_names_are_spelled_as_the_kernel_does():
    assert abi.errno_name(22) == "EINVAL"
    assert abi.errno_name(95) == "EOPNOTSUPP"  # Python's errno table calls it ENOTSUP
    assert abi.errno_name(133) == "EHWPOISON"  # absent from Python 3.11's errno module
    assert abi.errno_name(4000) == "errno 4000"
    assert abi.KvmError(95, "KVM_PRE_FAULT_MEMORY").errno_name == "EOPNOTSUPP"


def test_kvm_error_carries_errno_and_ioctl_name():
    with pytest.raises(abi.KvmError) as info:
        abi.ioctl(-1, abi.KVM_GET_API_VERSION, target="nothing")
    e = info.value
    assert e.errno == 9  # EBADF
    assert e.ioctl == "KVM_GET_API_VERSION"
    assert str(e) == "KVM_GET_API_VERSION failed on nothing: EBADF (Bad file descriptor)"
    assert isinstance(e, OSError)


def test_no_fcntl_anywhere_in_the_project():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for package in ("kvm_abi", "vmm"):
        for dirpath, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name)) as f:
                        text = f.read()
                    if "import fcntl" in text or "from fcntl" in text:
                        offenders.append(name)
    assert offenders == []


# --- against the system's linux/kvm.h, for the structs it has --------------------------------
C_CHECKED = [
    ("struct kvm_regs", ["rip", "rflags"]),
    ("struct kvm_sregs", ["tr", "gdt", "cr0", "efer", "apic_base", "interrupt_bitmap"]),
    ("struct kvm_segment", ["selector", "type", "unusable"]),
    ("struct kvm_fpu", ["fcw", "last_ip", "xmm", "mxcsr"]),
    ("struct kvm_run", ["immediate_exit", "exit_reason", "io", "kvm_valid_regs", "s"]),
    ("struct kvm_userspace_memory_region", ["guest_phys_addr", "userspace_addr"]),
    ("struct kvm_cpuid_entry2", ["flags", "eax", "padding"]),
    ("struct kvm_msr_entry", ["data"]),
    ("struct kvm_guest_debug", ["arch"]),
    ("struct kvm_pit_config", ["pad"]),
    ("struct kvm_irq_level", ["level"]),
    ("struct kvm_dirty_log", ["slot"]),
    ("struct kvm_translation", ["valid", "usermode"]),
    ("struct kvm_enable_cap", ["args", "pad"]),
    ("struct kvm_msi", ["devid"]),
    ("struct kvm_coalesced_mmio_zone", ["addr", "pio"]),  # not "size": the table's own key
    ("struct kvm_coalesced_mmio", ["phys_addr", "len", "pio", "data"]),
]
# Newer structs are checked only if the installed header defines them.
C_OPTIONAL = [
    (
        "struct kvm_userspace_memory_region2",
        ["guest_memfd_offset", "guest_memfd", "pad2"],
        "KVM_SET_USER_MEMORY_REGION2",
    ),
    ("struct kvm_create_guest_memfd", ["reserved"], "KVM_CREATE_GUEST_MEMFD"),
    ("struct kvm_memory_attributes", ["flags"], "KVM_SET_MEMORY_ATTRIBUTES"),
    ("struct kvm_pre_fault_memory", ["flags", "padding"], "KVM_PRE_FAULT_MEMORY"),
]


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]

    def emit(ctype: str, fields: list[str]) -> None:
        lines.append(f'printf("{ctype} size %zu\\n", sizeof({ctype}));')
        for f in fields:
            lines.append(f'printf("{ctype} {f} %zu\\n", offsetof({ctype}, {f}));')

    for ctype, fields in C_CHECKED:
        emit(ctype, fields)
    for ctype, fields, macro in C_OPTIONAL:
        lines.append(f"#ifdef {macro}")
        emit(ctype, fields)
        lines.append(f'printf("{macro} number %lu\\n", (unsigned long){macro});')
        lines.append("#endif")
    for name in ("KVM_RUN", "KVM_GET_REGS", "KVM_SET_SREGS", "KVM_SET_USER_MEMORY_REGION", "KVM_CREATE_PIT2"):
        lines.append(f'printf("{name} number %lu\\n", (unsigned long){name});')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_layouts(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to check against linux/kvm.h")
    if not os.path.exists("/usr/include/linux/kvm.h"):
        pytest.skip("no /usr/include/linux/kvm.h (install linux-libc-dev)")
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "check.c", d / "check"
    src.write_text(_c_program())
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    table: dict[tuple[str, str], int] = {}
    for line in out.splitlines():
        *name, field, value = line.split()
        table[(" ".join(name), field)] = int(value)
    return table


def test_layouts_match_the_system_header(c_layouts):
    checked = 0
    for (ctype, field), value in c_layouts.items():
        if field == "number":
            assert getattr(abi, ctype).number == value, ctype
        elif field == "size":
            assert ffi.sizeof(ctype) == value, ctype
        else:
            assert ffi.offsetof(ctype, field) == value, f"{ctype}.{field}"
        checked += 1
    assert checked >= 40


def test_the_compiled_fast_path_is_in_use_after_install():
    # `make test` installs the project, which builds the compiled module; VMM_CFFI=abi forces ABI mode.
    if os.environ.get("VMM_CFFI") == "abi":
        assert not abi.COMPILED
    else:
        assert abi.COMPILED, "kvm_abi._kvm_cffi was not built (is a C compiler installed?)"


def test_abi_mode_has_identical_layouts():
    code = (
        "import json, kvm_abi\n"
        f"print(json.dumps([kvm_abi.COMPILED] + [kvm_abi.ffi.sizeof(t) for t in {list(SIZES)!r}]))\n"
    )
    env = {**os.environ, "VMM_CFFI": "abi"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    compiled, *sizes = json.loads(out)
    assert compiled is False
    assert sizes == list(SIZES.values())
