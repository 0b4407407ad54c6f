"""Property tests: for random memslot layouts and random arguments, the emulation answers
exactly what the documented kernel semantics say (a small reference model below, written
from kvm-abi.md §2.3-§2.5 for KVM_PRE_FAULT_MEMORY and §4 / the RFC v1 code for
KVM_MAP_MEMORY), and it really populates what it reports as done."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kvm_abi as abi
from kvm_abi import MemoryMappingFlag
from vmm.memory import GuestMemory, GuestRegion, HostMemory
from vmm.prefault import EmulatedPrefault
from vmm.prefault.contract import new_mapping, new_range

PAGE = 4096
U64 = (1 << 64) - 1
MAX_PAGES = 48  # pages of host memory behind every layout (one mapping, sliced)


@dataclass(frozen=True)
class Slot:
    gpa: int
    size: int
    readonly: bool


@pytest.fixture(scope="module")
def backing() -> Iterator[HostMemory]:
    with HostMemory.allocate(MAX_PAGES * PAGE, "anon") as host:
        yield host


@st.composite
def layouts(draw: st.DrawFn) -> list[Slot]:
    """1-4 slots, in order, with gaps of 0-3 pages between them (0: adjacent slots),
    starting low, at 4 GiB, or just below the top of the 64-bit space."""
    base = draw(st.sampled_from([0, 1 << 32, (1 << 64) - (MAX_PAGES + 16) * PAGE])) // PAGE
    slots, used, gfn = [], 0, base + draw(st.integers(0, 3))
    for _ in range(draw(st.integers(1, 4))):
        pages = draw(st.integers(1, 12))
        if used + pages > MAX_PAGES:
            break
        slots.append(Slot(gfn * PAGE, pages * PAGE, draw(st.booleans())))
        used += pages
        gfn += pages + draw(st.integers(0, 3))
    return slots


def mostly(usual: st.SearchStrategy[int], rare: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """``usual`` seven times in eight, else ``rare`` (so that most calls get past the
    argument checks and exercise the memslot walk)."""
    return st.integers(0, 7).flatmap(lambda k: usual if k else rare)


def interesting_addresses(slots: list[Slot]) -> st.SearchStrategy[int]:
    """Mostly page-aligned addresses in and around the slots; sometimes anything."""
    edges = [s.gpa for s in slots] + [s.gpa + s.size for s in slots]
    near = sorted({(e + d * PAGE) & U64 for e in edges for d in (-2, -1, 0, 1)})
    inside = st.sampled_from(slots).flatmap(
        lambda s: st.integers(0, s.size // PAGE - 1).map(lambda i: s.gpa + i * PAGE)
    )
    odd = st.sampled_from([a + 1 for a in edges] + [(1 << 64) - PAGE, 0]) | st.integers(0, U64)
    return mostly(st.sampled_from(near) | inside, odd)


def sizes() -> st.SearchStrategy[int]:
    """Mostly whole pages (0 included); sometimes unaligned, huge, or anything."""
    pages = st.integers(0, 24).map(lambda n: n * PAGE)
    odd = st.sampled_from([1, 100, PAGE + 1, (1 << 64) - PAGE, 1 << 63]) | st.integers(0, U64)
    return mostly(pages, odd)


def flag_values() -> st.SearchStrategy[int]:
    """0 most of the time (the only valid value), else a random u64."""
    return mostly(st.just(0), st.integers(1, U64))


def build(slots: list[Slot], host: HostMemory) -> GuestMemory:
    memory = GuestMemory()
    offset = 0
    for s in slots:
        flags = int(abi.MemFlag.READONLY) if s.readonly else 0
        memory.add(GuestRegion(s.gpa, s.size, host, flags=flags, host_offset=offset))
        offset += s.size
    return memory


def covered_end(slots: list[Slot], gpa: int, end: int, *, stop_at_readonly: bool = False) -> int:
    """How far [gpa, end) is covered by slots without a hole (or a read-only slot when
    the access is a write): where the kernel's loop stops."""
    at = gpa
    while at < end:
        slot = next((s for s in slots if s.gpa <= at < s.gpa + s.size), None)
        if slot is None or (stop_at_readonly and slot.readonly):
            break
        at = min(end, slot.gpa + slot.size)
    return at


def expected_pre_fault(slots: list[Slot], gpa: int, size: int, flags: int) -> tuple[int, int, int]:
    """(ret, gpa, size) after one KVM_PRE_FAULT_MEMORY call, per kvm-abi.md §2.3-§2.5."""
    if flags or gpa % PAGE or size % PAGE or (gpa + size) & U64 <= gpa:
        return errno.EINVAL, gpa, size
    done = covered_end(slots, gpa, gpa + size)
    if done == gpa:
        return errno.ENOENT, gpa, size
    return 0, done, gpa + size - done


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_pre_fault_memory_matches_the_documented_semantics(backing, data):
    slots = data.draw(layouts())
    gpa = data.draw(interesting_addresses(slots))
    size = data.draw(sizes())
    flags = data.draw(flag_values())
    padding = data.draw(st.integers(0, U64))
    memory = build(slots, backing)
    rng = new_range(gpa, size, flags)
    rng.padding[4] = padding  # never validated
    rc = EmulatedPrefault(memory).pre_fault_memory(None, rng)
    event(f"pre_fault_memory -> {errno.errorcode.get(rc, rc)}{' partial' if rc == 0 and rng.size else ''}")
    assert (rc, rng.gpa, rng.size) == expected_pre_fault(slots, gpa, size, flags)
    assert rng.flags == flags
    if rc == 0:  # what it reports as done is really there (mincore)
        for region in memory:
            lo, hi = max(region.gpa, gpa), min(region.end, rng.gpa)
            if lo < hi:
                assert region.host.resident_bytes(region.host_offset + lo - region.gpa, hi - lo) == hi - lo


def expected_map_memory(slots: list[Slot], gfn: int, nr: int, flags: int, source: int) -> tuple[int, int, int, int]:
    """(ret, base_gfn, nr_pages, source) after one RFC v1 KVM_MAP_MEMORY call on a VM
    without private memory: the checks of kvm_vcpu_map_memory(), then one page at a time
    until done (0), stopped after progress (EAGAIN), or stopped at once (EFAULT: no
    slot, or a write to a read-only slot)."""
    if flags & ~0xF or flags & MemoryMappingFlag.PRIVATE:
        return errno.EINVAL, gfn, nr, source
    if source % PAGE or not nr or (gfn + nr) & U64 <= gfn:
        return errno.EINVAL, gfn, nr, source
    # No memslot lies at or above 2^64 bytes, however large the gfn.
    start, end = gfn * PAGE, min((gfn + nr) * PAGE, 1 << 64)
    done = covered_end(slots, start, end, stop_at_readonly=bool(flags & MemoryMappingFlag.WRITE))
    pages = (done - start) // PAGE
    advanced = source + pages * PAGE if source else 0
    if pages == nr:
        return 0, gfn + pages, 0, advanced
    return (errno.EAGAIN if pages else errno.EFAULT), gfn + pages, nr - pages, advanced


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_map_memory_matches_the_rfc(backing, data):
    slots = data.draw(layouts())
    gfn = data.draw(interesting_addresses(slots)) // PAGE
    nr = data.draw(st.one_of(st.integers(0, 20), st.integers(0, 20), st.sampled_from([(1 << 52), U64])))
    flags = data.draw(st.one_of(st.sampled_from([0, 1, 3, 5, 7]), st.sampled_from([0, 1, 8]) | st.integers(0, U64)))
    with HostMemory.allocate(24 * PAGE, "anon") as src:
        src.view[:] = bytes(range(256)) * (24 * PAGE // 256)
        source = data.draw(st.sampled_from([0, src.addr, src.addr, src.addr + 1]))
        if source and nr > 24:
            nr = 24  # the source buffer bounds a copying call
        memory = build(slots, backing)
        mapping = new_mapping(gfn, nr, flags, source)
        with EmulatedPrefault(memory) as emu:
            rc = emu.map_memory(None, mapping)
        expected = expected_map_memory(slots, gfn, nr, flags, source)
        event(f"map_memory -> {errno.errorcode.get(rc, rc)}{' with source' if source else ''}")
        assert (rc, mapping.base_gfn, mapping.nr_pages, mapping.source) == expected
        if source == src.addr:  # every page mapped so far holds its page of the source
            for i in range(mapping.base_gfn - gfn):
                assert memory.read((gfn + i) * PAGE, PAGE) == src.view[i * PAGE : (i + 1) * PAGE].tobytes()
