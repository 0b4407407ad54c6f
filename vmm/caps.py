"""``vmm caps``: what the host's KVM offers, by name, and what that means for a user."""

from __future__ import annotations

from typing import Any

from kvm_abi import Cap, GuestMemfdFlag, KvmError, VmType
from vmm.errors import Unavailable
from vmm.kvm import Kvm, kvm_device_path

# The capabilities this project uses, in the order the report lists them.
USED_CAPS = (
    Cap.USER_MEMORY,
    Cap.SET_TSS_ADDR,
    Cap.SET_IDENTITY_MAP_ADDR,
    Cap.EXT_CPUID,
    Cap.NR_VCPUS,
    Cap.MAX_VCPUS,
    Cap.MAX_VCPU_ID,
    Cap.NR_MEMSLOTS,
    Cap.IRQCHIP,
    Cap.PIT2,
    Cap.IMMEDIATE_EXIT,
    Cap.INTERNAL_ERROR_DATA,
    Cap.SET_GUEST_DEBUG,
    Cap.CHECK_EXTENSION_VM,
    Cap.READONLY_MEM,
    Cap.SYNC_MMU,
    Cap.COALESCED_MMIO,
    Cap.USER_MEMORY2,
    Cap.MEMORY_FAULT_INFO,
    Cap.MEMORY_ATTRIBUTES,
    Cap.GUEST_MEMFD,
    Cap.GUEST_MEMFD_FLAGS,
    Cap.VM_TYPES,
    Cap.PRE_FAULT_MEMORY,
)


PER_VM_CAPS = (Cap.GUEST_MEMFD, Cap.GUEST_MEMFD_FLAGS, Cap.MEMORY_ATTRIBUTES)


def _flag_names(value: int, flags: type[GuestMemfdFlag]) -> str:
    names = [f.name for f in flags if value & f and f.name]
    return "|".join(names) if names else "none"


def _vm_types(mask: int) -> str:
    names = [t.name.lower() for t in VmType if mask & (1 << t)]
    return ", ".join(names) if names else "default"


def caps_report() -> dict[str, Any]:
    """The ``vmm caps --json`` object (schema ``vmm/schema/caps.json``): ``device``,
    ``kvm_usable``, ``backend`` (what ``auto`` picks), ``reason`` (why not KVM, else None),
    ``api_version``, ``capabilities`` (names without ``KVM_CAP_`` -> values) and ``notes``
    (what the values mean)."""
    from vmm.schema import SCHEMA_VERSION

    device = kvm_device_path()
    report: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "device": device}
    caps: dict[str, int] = {}
    try:
        with Kvm(device) as kvm:
            api_version = kvm.get_api_version()
            for cap in USED_CAPS:
                caps[cap.name] = kvm.check_extension(cap)
            with kvm.create_vm() as vm:
                # What a default VM gets can differ from /dev/kvm's answer: guest_memfd and
                # memory attributes depend on the VM type (6.12: 1 and 8 on /dev/kvm, 0 on a
                # default VM), so report those as a default VM sees them.
                for cap in PER_VM_CAPS:
                    caps[cap.name] = vm.check_extension(cap)
    except (Unavailable, KvmError) as e:
        from vmm.backends import emulator_usable

        notes = [f"KVM is not usable: {e}"]
        usable, why = emulator_usable()
        if not usable:
            notes.append(why)  # and neither is what auto would fall back to
        report.update(
            kvm_usable=False,
            backend="emulator",
            reason=str(e),
            api_version=None,
            capabilities={},
            notes=notes,
        )
        return report
    report.update(
        kvm_usable=True, backend="kvm", reason=None, api_version=api_version, capabilities=caps, notes=_notes(caps)
    )
    return report


def _notes(r: dict[str, int]) -> list[str]:
    notes = []
    if r["PRE_FAULT_MEMORY"]:
        notes.append("pre-fault: available (KVM_PRE_FAULT_MEMORY; --prefault auto uses it)")
    else:
        notes.append(
            "pre-fault: not available (no two-dimensional paging: shadow paging or no EPT/NPT); "
            "--prefault auto populates in-process instead"
        )
    if r["GUEST_MEMFD"]:
        flags = r["GUEST_MEMFD_FLAGS"]
        mappable = flags & (GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED) == (
            GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
        )
        notes.append(
            f"guest_memfd: available, flags {_flag_names(flags, GuestMemfdFlag)}"
            + ("; --memory guest-memfd works" if mappable else "; not host-mappable, --memory guest-memfd unavailable")
        )
    elif r["VM_TYPES"] & ~1:
        notes.append("guest_memfd: not on a default VM; only on the private VM types below")
    else:
        notes.append("guest_memfd: not available")
    notes.append(f"VM types: {_vm_types(r['VM_TYPES'])}" if r["VM_TYPES"] else "VM types: default only")
    if not r["MEMORY_ATTRIBUTES"]:
        private = "only on the private VM types" if r["VM_TYPES"] & ~1 else "not available"
        notes.append(f"memory attributes (private memory): {private}")
    notes.append(f"vCPUs: {r['NR_VCPUS']} recommended, {r['MAX_VCPUS']} at most")
    return notes


def format_caps(r: dict[str, Any]) -> str:
    """The human-readable table."""
    lines = [f"device       {r['device']}"]
    if not r["kvm_usable"]:
        lines += [f"kvm          not usable: {r['reason']}", "backend      emulator (what --backend auto picks)"]
        lines += [f"             {n}" for n in r["notes"][1:]]  # e.g. that unicorn is not installed
        return "\n".join(lines)
    lines.append(f"api version  {r['api_version']}")
    lines.append("backend      kvm (what --backend auto picks)")
    lines.append("capabilities")
    for cap in USED_CAPS:
        where = "  on a default VM" if cap in PER_VM_CAPS else ""
        lines.append(f"  {cap.name:<24} {r['capabilities'][cap.name]:>6}  (KVM_CAP_{cap.name} = {int(cap)}){where}")
    lines.append("meaning")
    lines += [f"  {n}" for n in r["notes"]]
    return "\n".join(lines)
