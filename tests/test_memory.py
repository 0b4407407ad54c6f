"""Guest memory: backings, bounds-checked access, discard, residency (no KVM needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm.errors import ConfigError, GuestMemoryError, InputError
from vmm.memory import HUGE_PAGE_SIZE, Backing, GuestMemory, GuestRegion, HostMemory, parse_backing

MiB = 1 << 20


@pytest.fixture
def two_regions():
    mem = GuestMemory()
    low = HostMemory.allocate(2 * MiB, "anon")
    high = HostMemory.allocate(1 * MiB, "anon")
    mem.add(GuestRegion(0, 2 * MiB, low))
    mem.add(GuestRegion(0x100000000, 1 * MiB, high))
    yield mem
    low.close()
    high.close()


@pytest.mark.parametrize("backing", ["anon", "thp", "memfd"])
def test_backings_map_read_write_and_close(backing):
    with HostMemory.allocate(4 * MiB, backing) as host:
        assert host.backing is Backing(backing)
        host.view[100:105] = b"hello"
        assert bytes(host.view[100:105]) == b"hello"
        if backing == "thp":
            assert host.addr % HUGE_PAGE_SIZE == 0, "THP memory must be 2 MiB aligned"
        if backing == "memfd":
            assert host.fd >= 0
    assert host.closed
    with pytest.raises(ValueError):
        host.view  # noqa: B018


def vm_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping that starts at ``addr``, from /proc/self/smaps."""
    start = f"{addr:x}-"
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0]:
                inside = line.startswith(start)
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise AssertionError(f"no mapping starts at {addr:#x}")


@pytest.mark.parametrize(("backing", "flag"), [("anon", "nh"), ("thp", "hg")])
def test_anon_asks_for_4k_pages_and_thp_for_huge_pages(backing, flag):
    """anon is MADV_NOHUGEPAGE (4 KiB pages even where THP is "always"), thp MADV_HUGEPAGE:
    the kernel records each as a VmFlag of the mapping."""
    with HostMemory.allocate(4 * MiB, backing) as host:
        flags = vm_flags(host.addr)
        assert flag in flags and ({"nh", "hg"} - {flag}).isdisjoint(flags), flags


def test_hugetlb_without_reserved_pages_says_how_to_reserve(monkeypatch):
    monkeypatch.setattr("vmm.memory.hugetlb_pages_free", lambda: 0)
    with pytest.raises(ConfigError) as info:
        HostMemory.allocate(4 * MiB, "hugetlb")
    assert "nr_hugepages" in str(info.value) and "2 MiB huge pages" in str(info.value)


def test_unknown_backing_and_bad_sizes():
    with pytest.raises(InputError, match="unknown memory backing 'ram'"):
        parse_backing("ram")
    with pytest.raises(InputError):
        HostMemory.allocate(0, "anon")
    with pytest.raises(InputError):
        HostMemory.allocate(4097, "anon")
    with pytest.raises(ConfigError, match="created by a VM"):
        HostMemory.allocate(MiB, "guest-memfd")


def test_reads_and_writes_across_the_address_map(two_regions):
    mem = two_regions
    mem.write(0x1000, b"abc")
    mem.write(0x100000000 + 5, b"xyz")
    assert mem.read(0x1000, 3) == b"abc"
    assert mem.read(0x100000005, 3) == b"xyz"
    mem.write_u64(0x2000, 0x1122334455667788)
    assert mem.read_u64(0x2000) == 0x1122334455667788
    mem.fill(0x3000, 0x2000, 0xAB)
    assert mem.read(0x3000, 0x2000) == b"\xab" * 0x2000
    assert mem.total_size == 3 * MiB
    assert mem.top == 0x100000000 + MiB


@pytest.mark.parametrize(
    ("gpa", "size"),
    [(2 * MiB - 2, 4), (2 * MiB, 1), (0x100000000 - 1, 2), (0x100000000 + MiB, 1), (-1, 1), (0, -1)],
)
def test_out_of_bounds_access_is_refused_with_the_map(two_regions, gpa, size):
    with pytest.raises(GuestMemoryError) as info:
        two_regions.read(gpa, size)
    if gpa >= 0 and size >= 0:
        assert "0x0-0x1fffff" in str(info.value)


@given(gpa=st.integers(min_value=-(1 << 20), max_value=(1 << 33)), size=st.integers(min_value=0, max_value=1 << 22))
def test_bounds_check_agrees_with_the_region_map(gpa, size):
    # A pure model: allowed iff [gpa, gpa+size) sits inside one region.
    mem = GuestMemory()
    host = HostMemory.allocate(2 * MiB, "anon")
    try:
        mem.add(GuestRegion(0x400000, 2 * MiB, host))
        inside = gpa >= 0x400000 and gpa + size <= 0x600000
        assert mem.contains(gpa, size) == (inside and gpa >= 0)
        if inside:
            assert len(mem.view(gpa, size)) == size
        else:
            with pytest.raises(GuestMemoryError):
                mem.view(gpa, size)
    finally:
        host.close()


def test_overlapping_regions_are_refused(two_regions):
    extra = HostMemory.allocate(MiB, "anon")
    try:
        with pytest.raises(GuestMemoryError, match="overlaps"):
            two_regions.add(GuestRegion(MiB, MiB, extra))
    finally:
        extra.close()


@pytest.mark.parametrize("backing", ["anon", "thp", "memfd"])
def test_discard_gives_zeros_and_populate_makes_resident(backing):
    with HostMemory.allocate(4 * MiB, backing) as host:
        assert host.resident_bytes() == 0
        host.populate()
        assert host.resident_bytes() == 4 * MiB
        host.view[0x1000:0x1004] = b"data"
        host.discard(0, 2 * MiB)
        assert bytes(host.view[0x1000:0x1004]) == b"\0\0\0\0"
        with pytest.raises(GuestMemoryError):
            host.discard(1, 4096)
