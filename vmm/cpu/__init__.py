"""Boot state: the memory layout every guest can rely on, descriptor tables, page
tables, and the register state of each CPU mode. Backend-neutral: the KVM backend
turns a :class:`CpuState` into kvm_sregs/kvm_regs, the emulator into its registers."""

from vmm.cpu.layout import BootLayout, CpuMode
from vmm.cpu.state import CpuState, Segment, boot_state, write_system_tables

__all__ = ["BootLayout", "CpuMode", "CpuState", "Segment", "boot_state", "write_system_tables"]
