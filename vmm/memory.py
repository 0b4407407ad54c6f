"""Guest RAM: host mappings (backings), guest-physical regions, bounds-checked access.

Every host-side read or write of guest-physical memory goes through
:class:`GuestMemory`, which checks that the whole range lies inside one region
and raises :class:`~vmm.errors.GuestMemoryError` naming the address and the map
otherwise. Devices never index raw buffers with guest-supplied numbers.

Backings (``--memory``):

========== ==============================================================
anon       anonymous private memory, 4 KiB pages (MADV_NOHUGEPAGE, whatever the host's THP mode)
thp        anonymous, 2 MiB aligned, MADV_HUGEPAGE (the default: fastest first touch)
memfd      memfd_create + MAP_SHARED (shareable with other processes)
hugetlb    MAP_HUGETLB 2 MiB pages from the host's reserved pool
guest-memfd KVM_CREATE_GUEST_MEMFD, mapped by the host (MMAP|INIT_SHARED)
========== ==============================================================
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

import kvm_abi as abi
from kvm_abi import PAGE_SIZE, KvmError, ffi
from vmm.errors import ConfigError, GuestMemoryError, InputError

HUGE_PAGE_SIZE = 2 << 20


class Backing(StrEnum):
    """How guest RAM is backed on the host."""

    ANON = "anon"
    THP = "thp"
    MEMFD = "memfd"
    HUGETLB = "hugetlb"
    GUEST_MEMFD = "guest-memfd"


DEFAULT_BACKING = Backing.THP


def parse_backing(name: str | Backing) -> Backing:
    """``"thp"`` -> Backing.THP; InputError naming the choices otherwise."""
    try:
        return Backing(name)
    except ValueError:
        choices = ", ".join(b.value for b in Backing)
        raise InputError(f"unknown memory backing {name!r} (choose from {choices})") from None


def hugetlb_pages_free() -> int:
    """Free 2 MiB pages in the host's hugetlb pool (/proc/meminfo), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class HostMemory:
    """One host mapping that backs guest RAM. Owns the mapping (and its fd, if any).

    ``view`` is a writable memoryview of the whole mapping; it and every slice of it
    are valid until :meth:`close`.
    """

    __slots__ = ("addr", "size", "backing", "fd", "_map_addr", "_map_size", "_view", "__weakref__")

    def __init__(self, addr: int, size: int, backing: Backing, fd: int, map_addr: int, map_size: int) -> None:
        self.addr = addr
        self.size = size
        self.backing = backing
        self.fd = fd
        self._map_addr = map_addr
        self._map_size = map_size
        self._view: memoryview | None = memoryview(ffi.buffer(ffi.cast("char *", addr), size))

    # --- allocation ----------------------------------------------------------------------
    @classmethod
    def allocate(cls, size: int, backing: Backing | str = DEFAULT_BACKING) -> HostMemory:
        """Map ``size`` bytes with ``backing`` (all but guest-memfd, which needs a VM:
        see :meth:`from_guest_memfd`). Nothing is populated yet."""
        backing = parse_backing(backing)
        if size <= 0 or size % PAGE_SIZE:
            raise InputError(f"guest memory size {size:#x} is not a positive multiple of 4 KiB")
        rw = abi.PROT_READ | abi.PROT_WRITE
        if backing is Backing.ANON:
            flags = abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_NORESERVE
            addr = abi.libc_mmap(size, rw, flags)
            # A host with THP "always" would hand out 2 MiB pages here too; anon means
            # 4 KiB pages, so that choosing it (to compare fault counts, say) is a choice.
            try:
                abi.libc_madvise(addr, size, abi.MADV_NOHUGEPAGE)
            except KvmError:
                pass  # a kernel without THP: 4 KiB pages anyway
            return cls(addr, size, backing, -1, addr, size)
        if backing is Backing.THP:
            return cls._allocate_thp(size)
        if backing is Backing.MEMFD:
            fd = os.memfd_create("vmm-guest-ram", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                addr = abi.libc_mmap(size, rw, abi.MAP_SHARED, fd)
            except BaseException:
                os.close(fd)
                raise
            return cls(addr, size, backing, fd, addr, size)
        if backing is Backing.HUGETLB:
            return cls._allocate_hugetlb(size)
        raise ConfigError("guest-memfd memory is created by a VM: use Vm.add_memory(backing='guest-memfd')")

    @classmethod
    def _allocate_thp(cls, size: int) -> HostMemory:
        # Over-map by 2 MiB and trim, so that guest 2 MiB frames line up with host
        # 2 MiB pages; otherwise no guest frame can ever be backed by a huge page.
        rw = abi.PROT_READ | abi.PROT_WRITE
        flags = abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_NORESERVE
        span = size + HUGE_PAGE_SIZE
        raw = abi.libc_mmap(span, rw, flags)
        addr = (raw + HUGE_PAGE_SIZE - 1) & ~(HUGE_PAGE_SIZE - 1)
        head, tail = addr - raw, raw + span - (addr + size)
        if head:
            abi.libc_munmap(raw, head)
        if tail:
            abi.libc_munmap(addr + size, tail)
        try:
            abi.libc_madvise(addr, size, abi.MADV_HUGEPAGE)
        except KvmError:
            pass  # THP disabled on this host ("never"): still correct, just 4 KiB pages
        return cls(addr, size, Backing.THP, -1, addr, size)

    @classmethod
    def _allocate_hugetlb(cls, size: int) -> HostMemory:
        if size % HUGE_PAGE_SIZE:
            raise InputError(f"hugetlb memory must be a multiple of 2 MiB, not {size:#x} bytes")
        needed = size // HUGE_PAGE_SIZE
        free = hugetlb_pages_free()
        if free < needed:
            raise ConfigError(
                f"hugetlb backing needs {needed} free 2 MiB huge pages, the host has {free}; "
                f"reserve them with: echo {needed} | sudo tee /proc/sys/vm/nr_hugepages"
            )
        rw = abi.PROT_READ | abi.PROT_WRITE
        flags = abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_HUGETLB
        try:
            addr = abi.libc_mmap(size, rw, flags)
        except KvmError as e:
            raise ConfigError(
                f"hugetlb mmap of {size >> 20} MiB failed ({e.errno_name}); reserve huge pages with: "
                f"echo {needed} | sudo tee /proc/sys/vm/nr_hugepages"
            ) from e
        return cls(addr, size, Backing.HUGETLB, -1, addr, size)

    @classmethod
    def from_guest_memfd(cls, fd: int, size: int) -> HostMemory:
        """Map a guest_memfd created with MMAP|INIT_SHARED (MAP_SHARED, as the kernel
        requires). Takes ownership of ``fd``."""
        try:
            addr = abi.libc_mmap(size, abi.PROT_READ | abi.PROT_WRITE, abi.MAP_SHARED, fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(addr, size, Backing.GUEST_MEMFD, fd, addr, size)

    # --- access --------------------------------------------------------------------------
    @property
    def view(self) -> memoryview:
        """The whole mapping as a writable memoryview (valid until close())."""
        if self._view is None:
            raise ValueError("host memory is closed")
        return self._view

    @property
    def closed(self) -> bool:
        return self._view is None

    def populate(self, offset: int = 0, length: int | None = None, *, write: bool = True) -> None:
        """Fault the host pages in now (MADV_POPULATE_WRITE, or _READ with ``write=False``)."""
        length = self.size - offset if length is None else length
        self._check(offset, length)
        advice = abi.MADV_POPULATE_WRITE if write else abi.MADV_POPULATE_READ
        abi.libc_madvise(self.addr + offset, length, advice)

    def discard(self, offset: int, length: int) -> None:
        """Give the pages back to the host; they read as zero afterwards (host and guest:
        KVM's MMU notifiers drop its mappings). guest_memfd and memfd punch a hole."""
        self._check(offset, length)
        if self.fd >= 0:  # memfd, guest_memfd: the file owns the pages
            abi.libc_fallocate(self.fd, abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_KEEP_SIZE, offset, length)
            return
        abi.libc_madvise(self.addr + offset, length, abi.MADV_DONTNEED)

    def resident_bytes(self, offset: int = 0, length: int | None = None) -> int:
        """Bytes of this mapping resident in host RAM now (mincore)."""
        length = self.size - offset if length is None else length
        self._check(offset, length)
        vec = abi.libc_mincore(self.addr + offset, length)
        return (len(vec) - vec.count(0)) * PAGE_SIZE  # mincore sets only bit 0

    def _check(self, offset: int, length: int) -> None:
        if self._view is None:
            raise ValueError("host memory is closed")
        if offset < 0 or length < 0 or offset + length > self.size or offset % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(
                f"host range +{offset:#x} len {length:#x} is not page-aligned inside {self.size:#x} bytes"
            )

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap (and close the fd). Idempotent. Every view of this memory becomes invalid."""
        if self._view is None:
            return
        view, self._view = self._view, None
        view.release()
        abi.libc_munmap(self._map_addr, self._map_size)
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> HostMemory:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HostMemory({self.backing.value}, {self.size:#x} bytes at {self.addr:#x})"


@dataclass(eq=False)
class GuestRegion:
    """A guest-physical range [gpa, gpa+size) backed by ``host`` (from ``host_offset``),
    registered as memslot ``slot`` (or -1 where no KVM memslot exists: the emulator)."""

    gpa: int
    size: int
    host: HostMemory
    slot: int = -1
    flags: int = 0
    host_offset: int = 0
    guest_memfd: int = -1  # private memory: the guest_memfd behind the slot (owned)
    private: bool = False  # marked KVM_MEMORY_ATTRIBUTE_PRIVATE: the host cannot read it

    def release(self) -> None:
        """Free the host memory (and the guest_memfd of a private region). Idempotent."""
        self.host.close()
        if self.guest_memfd >= 0:
            fd, self.guest_memfd = self.guest_memfd, -1
            os.close(fd)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_addr(self) -> int:
        return self.host.addr + self.host_offset

    @property
    def readonly(self) -> bool:
        return bool(self.flags & abi.MemFlag.READONLY)

    def __repr__(self) -> str:
        return f"GuestRegion(gpa={self.gpa:#x}, size={self.size:#x}, {self.host.backing.value}, slot={self.slot})"


def describe_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    """``[(0, 0x1000)]`` -> ``"0x0-0xfff"``: a RAM map for error messages."""
    return ", ".join(f"{base:#x}-{base + size - 1:#x}" for base, size in ranges) or "no RAM"


class GuestMemory:
    """The guest-physical address map: non-overlapping regions, bounds-checked access."""

    __slots__ = ("_regions", "_starts")

    def __init__(self) -> None:
        self._regions: list[GuestRegion] = []
        self._starts: list[int] = []

    def add(self, region: GuestRegion) -> GuestRegion:
        """Insert a region; raises GuestMemoryError if it overlaps another."""
        if region.size <= 0 or region.gpa < 0 or region.gpa % PAGE_SIZE or region.size % PAGE_SIZE:
            raise GuestMemoryError(f"bad region {region.gpa:#x}+{region.size:#x}", region.gpa, region.size)
        for other in self._regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise GuestMemoryError(
                    f"guest range {region.gpa:#x}-{region.end - 1:#x} overlaps {other}", region.gpa, region.size
                )
        i = bisect.bisect(self._starts, region.gpa)
        self._regions.insert(i, region)
        self._starts.insert(i, region.gpa)
        return region

    def remove(self, region: GuestRegion) -> None:
        """Forget a region (the caller deletes the memslot and closes the host memory)."""
        i = self._regions.index(region)
        del self._regions[i]
        del self._starts[i]

    def __iter__(self) -> Iterator[GuestRegion]:
        return iter(list(self._regions))

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self._regions)

    @property
    def top(self) -> int:
        """One past the highest guest-physical address with RAM (0 if none)."""
        return self._regions[-1].end if self._regions else 0

    def describe(self) -> str:
        """The map, one ``gpa-end`` range per region, for error messages."""
        return describe_ranges((r.gpa, r.size) for r in self._regions)

    def region_at(self, gpa: int) -> GuestRegion | None:
        """The region containing ``gpa``, or None."""
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            if gpa < r.end:
                return r
        return None

    def find(self, gpa: int, size: int) -> tuple[GuestRegion, int]:
        """(region, offset in the region's host memory) for [gpa, gpa+size), which must
        lie inside one region; GuestMemoryError otherwise."""
        if gpa < 0 or size < 0:
            raise GuestMemoryError(f"guest range {gpa:#x}+{size:#x} is negative", gpa, size)
        r = self.region_at(gpa)
        if r is None or gpa + size > r.end:
            raise GuestMemoryError(
                f"guest range {gpa:#x}-{gpa + max(size, 1) - 1:#x} is not inside guest RAM ({self.describe()})",
                gpa,
                size,
            )
        if r.private:
            raise GuestMemoryError(
                f"guest range {gpa:#x}-{gpa + max(size, 1) - 1:#x} is private memory: the host cannot access it",
                gpa,
                size,
            )
        return r, r.host_offset + (gpa - r.gpa)

    def contains(self, gpa: int, size: int = 1) -> bool:
        """True if [gpa, gpa+size) lies inside one region."""
        r = self.region_at(gpa) if gpa >= 0 else None
        return r is not None and gpa + size <= r.end

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable view of [gpa, gpa+size); valid until the memory is closed."""
        r, off = self.find(gpa, size)
        return r.host.view[off : off + size]

    def read(self, gpa: int, size: int) -> bytes:
        """Copy ``size`` bytes out of guest memory."""
        r, off = self.find(gpa, size)
        return r.host.view[off : off + size].tobytes()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa``."""
        n = len(data)
        r, off = self.find(gpa, n)
        r.host.view[off : off + n] = data

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        """Set [gpa, gpa+size) to ``byte``."""
        r, off = self.find(gpa, size)
        view = r.host.view[off : off + size]
        chunk = bytes([byte]) * min(size, 1 << 20)
        for start in range(0, size, len(chunk) or 1):
            end = min(start + len(chunk), size)
            view[start:end] = chunk[: end - start]

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def resident_bytes(self) -> int:
        """Bytes of guest RAM resident in host memory now (mincore over every region)."""
        return sum(r.host.resident_bytes(r.host_offset, r.size) for r in self._regions)
