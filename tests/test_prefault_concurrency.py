"""Several threads pre-faulting overlapping ranges at once, repeatedly: no errors, every
page populated afterwards (mincore), and for the RFC's copying call, no page ever mixes
two callers' contents."""

from __future__ import annotations

import errno
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest

from kvm_abi import MemoryMappingFlag
from vmm.memory import GuestMemory, GuestRegion, HostMemory
from vmm.prefault import EmulatedPrefault, HelperVcpus, kernel
from vmm.prefault.contract import drive_map_memory, drive_pre_fault

PAGE = 4096
MiB = 1 << 20
THREADS = 4
ROUNDS = 12


def hammer(call: Callable[[Any, Any], int], vcpus: list[Any], base: int, size: int) -> list[BaseException]:
    """THREADS threads, each ROUNDS random overlapping ranges through the driver loop."""
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(index: int) -> None:
        rnd = random.Random(index)
        start.wait()
        try:
            for _ in range(ROUNDS):
                first = rnd.randrange(0, size // PAGE - 1)
                pages = rnd.randrange(1, size // PAGE - first + 1)
                done = drive_pre_fault(call, vcpus[index], base + first * PAGE, pages * PAGE)
                assert done == pages * PAGE
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_emulated_pre_fault_from_four_threads_populates_every_page():
    memory = GuestMemory()
    regions = [
        memory.add(GuestRegion(0, 16 * MiB, HostMemory.allocate(16 * MiB, "anon"))),
        memory.add(GuestRegion(16 * MiB, 16 * MiB, HostMemory.allocate(16 * MiB, "thp"))),
    ]
    try:
        with EmulatedPrefault(memory) as emu:
            errors = hammer(emu.pre_fault_memory, [None] * THREADS, 0, 32 * MiB)
            assert errors == []
            # Whatever the random ranges missed, one final pass covers; all of it resident.
            assert drive_pre_fault(emu.pre_fault_memory, None, 0, 32 * MiB) == 32 * MiB
        assert memory.resident_bytes() == 32 * MiB
    finally:
        for r in regions:
            r.host.close()


@pytest.mark.kvm
@pytest.mark.requires_cap("PRE_FAULT_MEMORY")
def test_kernel_pre_fault_from_four_vcpus_populates_every_page(kvm):
    with kvm.create_vm() as vm, HelperVcpus(vm) as helpers:
        vm.add_memory(0, 8 * MiB, "anon")
        vcpus = helpers.get(THREADS)
        assert len(vcpus) == THREADS and len({v.index for v in vcpus}) == THREADS
        assert hammer(kernel.pre_fault_memory, vcpus, 0, 8 * MiB) == []
        assert drive_pre_fault(kernel.pre_fault_memory, vcpus[0], 0, 8 * MiB) == 8 * MiB
        # KVM faulted every page for read: the host maps them (the zero page counts).
        assert vm.memory.resident_bytes() == 8 * MiB


def test_emulated_map_memory_with_sources_never_tears_a_page():
    """Each thread maps overlapping ranges from its own source (every byte = its id).
    Callers see 0 or EAGAIN only (the driver retries EAGAIN); every page afterwards is
    wholly one caller's."""
    size = 8 * MiB
    memory = GuestMemory()
    region = memory.add(GuestRegion(0, size, HostMemory.allocate(size, "anon")))
    sources = [HostMemory.allocate(size, "anon") for _ in range(THREADS)]
    answers: set[int] = set()
    lock = threading.Lock()
    try:
        for i, src in enumerate(sources):
            src.view[:] = bytes([i + 1]) * size
        with EmulatedPrefault(memory) as emu:

            def call(vcpu: Any, mapping: Any) -> int:
                rc = emu.map_memory(vcpu, mapping)
                with lock:
                    answers.add(rc)
                return rc

            errors: list[BaseException] = []

            def worker(index: int) -> None:
                rnd = random.Random(100 + index)
                try:
                    for _ in range(ROUNDS):
                        first = rnd.randrange(0, size // PAGE - 1)
                        pages = rnd.randrange(1, size // PAGE - first + 1)
                        drive_map_memory(
                            call,
                            None,
                            first * PAGE,
                            pages * PAGE,
                            int(MemoryMappingFlag.WRITE),
                            sources[index].addr + first * PAGE,
                        )
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert errors == []
        assert answers <= {0, errno.EAGAIN}
        data = region.host.view
        for page in range(size // PAGE):
            chunk = data[page * PAGE : (page + 1) * PAGE]
            assert chunk.tobytes() == bytes([chunk[0]]) * PAGE, f"page {page} mixes callers' data"
    finally:
        region.host.close()
        for src in sources:
            src.close()
