"""``Vm``: one VM fd: memslots (v1, v2), guest_memfd, memory attributes, irqchip, vCPUs.

Raw ioctls are methods named after them; ``add_memory`` / ``remove_memory`` /
``discard`` are the policy layer on top, keeping guest RAM alive for as long as a
memslot points at it.
"""

from __future__ import annotations

import itertools
import os
from types import TracebackType
from typing import TYPE_CHECKING, Any

import kvm_abi as abi
from kvm_abi import Cap, GuestMemfdFlag, KvmError, MemFlag, ffi
from vmm.errors import ConfigError, GuestMemoryError, Unavailable
from vmm.memory import PAGE_SIZE, Backing, GuestMemory, GuestRegion, HostMemory, parse_backing
from vmm.vcpu import Vcpu

if TYPE_CHECKING:
    from vmm.kvm import Kvm

# Where the VM's real-mode helper structures go (kvmtool's and QEMU's choice): three
# pages for the TSS and one for the identity map, just below the 4 GiB BIOS area and
# inside the MMIO hole, never overlapping RAM.
DEFAULT_TSS_ADDR = 0xFFFBD000
DEFAULT_IDENTITY_MAP_ADDR = 0xFFFBC000

_vm_numbers = itertools.count()


class Vm:
    """A VM (create it with ``Kvm.create_vm()``). Closing it closes its vCPUs and frees
    its guest RAM.

    ``vcpus`` lists every vCPU created on it, closed ones too: KVM keeps a vCPU until its
    VM is destroyed, so a closed vCPU still holds its id and counts against
    KVM_CAP_MAX_VCPUS. Pre-population is :func:`vmm.prefault.prefault_vm` (it works on
    any VM-like object and this class never imports it).
    """

    __slots__ = ("kvm", "type", "name", "_fd", "memory", "vcpus", "_next_slot", "__weakref__")

    def __init__(self, kvm: Kvm, fd: int, vm_type: int = 0) -> None:
        self.kvm = kvm
        self.type = vm_type
        self.name = f"vm{next(_vm_numbers)}"
        self._fd = fd
        self.memory = GuestMemory()
        self.vcpus: list[Vcpu] = []
        self._next_slot = 0

    # --- lifetime ------------------------------------------------------------------------
    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.name} is closed")
        return self._fd

    def close(self) -> None:
        """Close vCPUs, then the VM fd, then unmap guest RAM (idempotent)."""
        if self._fd < 0:
            return
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        fd, self._fd = self._fd, -1
        os.close(fd)
        for region in self.memory:
            self.memory.remove(region)
            region.release()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Vm({self.name}, type={self.type}, fd={self._fd}, memory=[{self.memory.describe()}])"

    def _ioctl(self, op: abi.Ioctl, arg: Any = 0, detail: str = "") -> int:
        return abi.ioctl(self.fd, op, arg, target=self.name, detail=detail)

    # --- raw ioctls ----------------------------------------------------------------------
    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (values can differ per VM type)."""
        return self._ioctl(abi.KVM_CHECK_EXTENSION, int(cap), detail=f"cap {int(cap)}")

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int, userspace_addr: int) -> None:
        """KVM_SET_USER_MEMORY_REGION. The caller keeps [userspace_addr, +size) mapped for as
        long as the slot exists (``add_memory`` does this for you). size 0 deletes."""
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": userspace_addr,
            },
        )
        self._ioctl(abi.KVM_SET_USER_MEMORY_REGION, region, detail=f"slot={slot} gpa={gpa:#x} size={size:#x}")

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        gpa: int,
        size: int,
        userspace_addr: int,
        guest_memfd: int = 0,
        guest_memfd_offset: int = 0,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2): v1 plus a guest_memfd binding."""
        region = ffi.new(
            "struct kvm_userspace_memory_region2 *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": userspace_addr,
                "guest_memfd": guest_memfd,
                "guest_memfd_offset": guest_memfd_offset,
            },
        )
        self._ioctl(
            abi.KVM_SET_USER_MEMORY_REGION2,
            region,
            detail=f"slot={slot} flags={flags:#x} gpa={gpa:#x} size={size:#x} gmem={guest_memfd}",
        )

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD: a new guest_memfd fd of ``size`` bytes (caller closes it)."""
        args = ffi.new("struct kvm_create_guest_memfd *", {"size": size, "flags": flags})
        return self._ioctl(abi.KVM_CREATE_GUEST_MEMFD, args, detail=f"size={size:#x} flags={flags:#x}")

    def set_memory_attributes(self, gpa: int, size: int, attributes: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES (e.g. KVM_MEMORY_ATTRIBUTE_PRIVATE) on a range."""
        attrs = ffi.new("struct kvm_memory_attributes *", {"address": gpa, "size": size, "attributes": attributes})
        self._ioctl(abi.KVM_SET_MEMORY_ATTRIBUTES, attrs, detail=f"gpa={gpa:#x} size={size:#x}")

    def set_tss_addr(self, addr: int = DEFAULT_TSS_ADDR) -> None:
        """KVM_SET_TSS_ADDR: three pages KVM needs for real mode on Intel (arg is the address)."""
        self._ioctl(abi.KVM_SET_TSS_ADDR, addr, detail=f"addr={addr:#x}")

    def set_identity_map_addr(self, addr: int = DEFAULT_IDENTITY_MAP_ADDR) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR (arg is a pointer); only before the first vCPU exists."""
        self._ioctl(abi.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr), detail=f"addr={addr:#x}")

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and a LAPIC per later vCPU."""
        self._ioctl(abi.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2 (after the irqchip)."""
        self._ioctl(abi.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: set an interrupt line of the in-kernel irqchip."""
        self._ioctl(abi.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    def register_coalesced_zone(self, addr: int, size: int, *, pio: bool) -> None:
        """KVM_REGISTER_COALESCED_MMIO: writes to [addr, addr+size) (ports with ``pio``,
        KVM_CAP_COALESCED_PIO) go to the VM's coalesced ring instead of exiting, while it
        has room; reads still exit."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": addr, "size": size, "pio": int(pio)})
        self._ioctl(abi.KVM_REGISTER_COALESCED_MMIO, zone, detail=f"addr={addr:#x} size={size} pio={int(pio)}")

    def unregister_coalesced_zone(self, addr: int, size: int, *, pio: bool) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO of a zone registered before."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": addr, "size": size, "pio": int(pio)})
        self._ioctl(abi.KVM_UNREGISTER_COALESCED_MMIO, zone, detail=f"addr={addr:#x} size={size} pio={int(pio)}")

    def get_dirty_log(self, slot: int, bitmap: Any) -> None:
        """KVM_GET_DIRTY_LOG into ``bitmap`` (a cdata buffer of one bit per page)."""
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": int(ffi.cast("uintptr_t", bitmap))})
        self._ioctl(abi.KVM_GET_DIRTY_LOG, log, detail=f"slot={slot}")

    def create_vcpu(self, index: int) -> Vcpu:
        """KVM_CREATE_VCPU: vCPU ``index`` (its APIC id), with kvm_run mapped."""
        fd = self._ioctl(abi.KVM_CREATE_VCPU, index, detail=f"id={index}")
        try:
            vcpu = Vcpu(index, fd, self.kvm.get_vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    # --- guest memory (policy) -----------------------------------------------------------
    def add_memory(
        self,
        gpa: int,
        size: int,
        backing: Backing | str = Backing.THP,
        *,
        readonly: bool = False,
        slot: int | None = None,
        private: bool = False,
    ) -> GuestRegion:
        """Allocate ``size`` bytes of ``backing`` and make them guest RAM at ``gpa``.

        guest-memfd memory is created with KVM_CREATE_GUEST_MEMFD (MMAP|INIT_SHARED, as
        the VM offers), mapped by the host, and bound with KVM_SET_USER_MEMORY_REGION2;
        ``userspace_addr`` points at that mapping so host and guest stay coherent.

        ``private=True`` (guest-memfd backing, a VM type with private memory such as
        KVM_X86_SW_PROTECTED_VM) marks the range KVM_MEMORY_ATTRIBUTE_PRIVATE: the guest
        gets its pages from the guest_memfd, which the host never maps; shared accesses
        go to an anonymous mapping at ``userspace_addr``. Host reads of it are refused.
        """
        backing = parse_backing(backing)
        if gpa % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"guest RAM {gpa:#x}+{size:#x} is not page aligned", gpa, size)
        slot = self._next_slot if slot is None else slot
        flags = int(MemFlag.READONLY) if readonly else 0
        if private:
            return self._add_private_memory(gpa, size, backing, readonly, slot)
        if backing is Backing.GUEST_MEMFD:
            host = self._guest_memfd_memory(size, readonly)
            flags = int(MemFlag.GUEST_MEMFD)
        else:
            host = HostMemory.allocate(size, backing)
        region = GuestRegion(gpa, size, host, slot, flags)
        try:
            self.memory.add(region)
            try:
                if backing is Backing.GUEST_MEMFD:
                    self.set_user_memory_region2(slot, flags, gpa, size, host.addr, host.fd, 0)
                else:
                    self.set_user_memory_region(slot, flags, gpa, size, host.addr)
            except BaseException:
                self.memory.remove(region)
                raise
        except BaseException:
            host.close()
            raise
        self._next_slot = max(self._next_slot, slot + 1)
        return region

    def _guest_memfd_memory(self, size: int, readonly: bool) -> HostMemory:
        if readonly:
            raise ConfigError("guest-memfd memory cannot be read-only (KVM refuses GUEST_MEMFD|READONLY)")
        for cap in (Cap.USER_MEMORY2, Cap.GUEST_MEMFD):
            if not self.check_extension(cap):
                raise Unavailable(f"guest-memfd backing needs KVM_CAP_{cap.name}, which this kernel lacks", cap.name)
        wanted = GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED
        offered = self.check_extension(Cap.GUEST_MEMFD_FLAGS)
        if offered & wanted != wanted:
            raise Unavailable(
                "guest-memfd backing needs KVM_CAP_GUEST_MEMFD_FLAGS with MMAP|INIT_SHARED so the host "
                f"can map it; this VM offers {offered:#x}",
                "GUEST_MEMFD_FLAGS",
            )
        fd = self.create_guest_memfd(size, int(wanted))
        return HostMemory.from_guest_memfd(fd, size)

    def _add_private_memory(self, gpa: int, size: int, backing: Backing, readonly: bool, slot: int) -> GuestRegion:
        if backing is not Backing.GUEST_MEMFD or readonly:
            raise ConfigError("private memory lives in a guest_memfd: use backing 'guest-memfd', not read-only")
        attributes = self.check_extension(Cap.MEMORY_ATTRIBUTES)
        if not attributes & abi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
            raise Unavailable(
                "private memory needs KVM_CAP_MEMORY_ATTRIBUTES with PRIVATE on this VM type "
                f"(type {self.type} offers {attributes:#x}; create the VM with a private type, e.g. SW_PROTECTED)",
                "MEMORY_ATTRIBUTES",
            )
        for cap in (Cap.USER_MEMORY2, Cap.GUEST_MEMFD):
            if not self.check_extension(cap):
                raise Unavailable(
                    f"private memory needs KVM_CAP_{cap.name} on this VM (type {self.type}), which lacks it", cap.name
                )
        shared = HostMemory.allocate(size, Backing.ANON)  # what shared-attribute gfns map
        region = GuestRegion(gpa, size, shared, slot, int(MemFlag.GUEST_MEMFD), private=True)
        try:
            region.guest_memfd = self.create_guest_memfd(size, 0)  # never host-mapped
            self.memory.add(region)
            try:
                self.set_user_memory_region2(slot, region.flags, gpa, size, shared.addr, region.guest_memfd, 0)
                self.set_memory_attributes(gpa, size, abi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            except BaseException:
                self.memory.remove(region)
                raise
        except BaseException:
            region.release()
            raise
        self._next_slot = max(self._next_slot, slot + 1)
        return region

    def remove_memory(self, region: GuestRegion) -> None:
        """Delete the region's memslot and free its memory."""
        self.memory.remove(region)
        try:
            if region.slot >= 0 and self._fd >= 0:
                self.set_user_memory_region(region.slot, 0, region.gpa, 0, 0)
        finally:
            region.release()

    def discard(self, gpa: int, size: int) -> None:
        """Give [gpa, gpa+size) back to the host: host and guest read zeros afterwards.
        guest_memfd and memfd punch a hole (fallocate); anonymous memory MADV_DONTNEED."""
        region = self.memory.region_at(gpa)
        if region is not None and region.private and gpa + size <= region.end:
            offset = gpa - region.gpa
            try:  # the guest's pages are in the guest_memfd; the shared side goes too
                abi.libc_fallocate(region.guest_memfd, abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_KEEP_SIZE, offset, size)
                region.host.discard(offset, size)
            except KvmError as e:
                raise GuestMemoryError(f"discard {gpa:#x}+{size:#x} failed: {e}", gpa, size) from e
            return
        region, offset = self.memory.find(gpa, size)
        try:
            region.host.discard(offset, size)
        except KvmError as e:
            raise GuestMemoryError(f"discard {gpa:#x}+{size:#x} failed: {e}", gpa, size) from e
