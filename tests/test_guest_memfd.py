"""guest_memfd on this host (kvm-abi.md §9-D, host-kvm.md "guest_memfd here"): creation
flags come from KVM_CAP_GUEST_MEMFD_FLAGS, the file's mmap and fallocate rules, the
KVM_SET_USER_MEMORY_REGION2 binding rules, and host/guest coherence through the host
mapping (``userspace_addr`` must point at it on this KVM), including punched holes."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kvm_abi as abi
from kvm_abi import Cap, GuestMemfdFlag, KvmError, MemFlag
from vmm.config import MachineConfig
from vmm.errors import ConfigError
from vmm.machine import Machine
from vmm.memory import Backing, HostMemory
from vmm.prefault import prefault_vm

pytestmark = [pytest.mark.kvm, pytest.mark.requires_cap("GUEST_MEMFD")]

PAGE = 4096
MiB = 1 << 20
SHARED = int(GuestMemfdFlag.MMAP | GuestMemfdFlag.INIT_SHARED)
RW = abi.PROT_READ | abi.PROT_WRITE
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def vm(kvm) -> Iterator[Any]:
    """A bare default VM (no RAM): the tests bind their own guest_memfd slots."""
    with kvm.create_vm() as machine_vm:
        yield machine_vm


@pytest.fixture
def gmem(vm) -> Iterator[Callable[..., int]]:
    """gmem(size, flags) -> a guest_memfd fd, closed after the test."""
    fds: list[int] = []

    def create(size: int = 4 * MiB, flags: int = SHARED) -> int:
        fd = vm.create_guest_memfd(size, flags)
        fds.append(fd)
        return fd

    yield create
    for fd in fds:
        os.close(fd)


def errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(KvmError) as info:
        call()
    return int(info.value.errno or 0)


# --- creation ----------------------------------------------------------------------------
def test_exactly_the_offered_flags_are_accepted(vm, gmem):
    offered = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    assert offered & SHARED == SHARED  # this host: 3
    for bit in range(64):
        flag = 1 << bit
        if offered & flag:
            gmem(PAGE, flag)
        else:
            assert errno_of(lambda flag=flag: vm.create_guest_memfd(PAGE, flag)) == errno.EINVAL, f"bit {bit}"
    gmem(PAGE, offered)


@pytest.mark.parametrize("size", [0, 1, 4095, 4097])
def test_sizes_must_be_whole_pages(vm, size):
    assert errno_of(lambda: vm.create_guest_memfd(size, SHARED)) == errno.EINVAL


def test_the_file_has_its_size_and_refuses_read_and_write(gmem):
    fd = gmem(3 * PAGE)
    st = os.fstat(fd)
    assert (st.st_size, st.st_blksize) == (3 * PAGE, PAGE)
    with pytest.raises(OSError):
        os.read(fd, 16)
    with pytest.raises(OSError):
        os.write(fd, b"x")


# --- mmap --------------------------------------------------------------------------------
def test_mmap_needs_the_mmap_flag(gmem):
    fd = gmem(PAGE, 0)
    assert errno_of(lambda: abi.libc_mmap(PAGE, RW, abi.MAP_SHARED, fd)) == errno.ENODEV


def test_map_private_is_refused(gmem):
    fd = gmem(PAGE, SHARED)
    assert errno_of(lambda: abi.libc_mmap(PAGE, RW, abi.MAP_PRIVATE, fd)) == errno.EINVAL


def test_without_init_shared_the_memory_is_private_and_a_host_touch_is_sigbus():
    child = """
from kvm_abi import ffi
import kvm_abi as abi
from vmm import Kvm
with Kvm() as kvm, kvm.create_vm() as vm:
    fd = vm.create_guest_memfd(4096, 1)  # MMAP only
    addr = abi.libc_mmap(4096, abi.PROT_READ | abi.PROT_WRITE, abi.MAP_SHARED, fd)
    ffi.cast("char *", addr)[0] = b"x"
    print("host wrote private guest memory")
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stdout, proc.stderr)


def test_init_shared_mapping_reads_back_what_was_written(gmem):
    with HostMemory.from_guest_memfd(os.dup(gmem(2 * PAGE)), 2 * PAGE) as host:
        host.view[PAGE : PAGE + 5] = b"hello"
        assert host.view[PAGE : PAGE + 5].tobytes() == b"hello"
        assert host.view[:PAGE].tobytes() == bytes(PAGE)


# --- fallocate ---------------------------------------------------------------------------
def test_fallocate_rules_and_punched_pages_read_zero(gmem):
    fd = gmem(4 * PAGE)
    keep, punch = abi.FALLOC_FL_KEEP_SIZE, abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_KEEP_SIZE
    assert errno_of(lambda: abi.libc_fallocate(fd, 0, 0, PAGE)) == errno.EOPNOTSUPP
    abi.libc_fallocate(fd, keep, 0, 4 * PAGE)
    assert errno_of(lambda: abi.libc_fallocate(fd, keep, 4 * PAGE, PAGE)) == errno.EINVAL  # beyond EOF
    assert errno_of(lambda: abi.libc_fallocate(fd, punch, 1, PAGE)) == errno.EINVAL  # unaligned
    with HostMemory.from_guest_memfd(os.dup(fd), 4 * PAGE) as host:
        host.view[:] = b"\xaa" * (4 * PAGE)
        abi.libc_fallocate(fd, punch, PAGE, PAGE)
        assert host.view[PAGE : 2 * PAGE].tobytes() == bytes(PAGE)
        assert host.view[:PAGE].tobytes() == b"\xaa" * PAGE
    abi.libc_fallocate(fd, punch, 4 * PAGE, PAGE)  # at EOF: fine
    abi.libc_fallocate(fd, punch, 8 * PAGE, PAGE)  # past EOF: fine


# --- KVM_SET_USER_MEMORY_REGION2 binding -------------------------------------------------
def test_binding_rules(vm, gmem):
    gm = int(MemFlag.GUEST_MEMFD)
    fd = gmem(4 * MiB)
    host = HostMemory.from_guest_memfd(os.dup(fd), 4 * MiB)
    try:
        vm.set_user_memory_region2(0, gm, 0, 2 * MiB, host.addr, fd, 0)
        # The same file range for a second slot: EINVAL (6.12, 6.18) or EEXIST (7.2).
        assert errno_of(lambda: vm.set_user_memory_region2(1, gm, 8 * MiB, 2 * MiB, host.addr, fd, 0)) in (
            errno.EINVAL,
            errno.EEXIST,
        )
        cases = {
            "unaligned offset": (gm, 2 * MiB, 100),
            "offset + size beyond the file": (gm, 4 * MiB, 2 * MiB),
            "with LOG_DIRTY_PAGES": (gm | int(MemFlag.LOG_DIRTY_PAGES), 2 * MiB, 2 * MiB),
            "with READONLY": (gm | int(MemFlag.READONLY), 2 * MiB, 2 * MiB),
        }
        for what, (flags, size, offset) in cases.items():
            rc = errno_of(
                lambda f=flags, s=size, o=offset: vm.set_user_memory_region2(2, f, 16 * MiB, s, host.addr, fd, o)
            )
            assert rc == errno.EINVAL, what
        # A guest_memfd slot cannot move; it can be deleted.
        assert errno_of(lambda: vm.set_user_memory_region2(0, gm, 32 * MiB, 2 * MiB, host.addr, fd, 0)) == errno.EINVAL
        vm.set_user_memory_region2(0, gm, 0, 0, 0, fd, 0)
        # Binding with userspace_addr 0 is accepted (mainline's "gmem-only" slot).
        vm.set_user_memory_region2(3, gm, 64 * MiB, 2 * MiB, 0, fd, 2 * MiB)
        memfd = os.memfd_create("not-gmem", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, 4 * MiB)
            assert (
                errno_of(lambda: vm.set_user_memory_region2(4, gm, 96 * MiB, 2 * MiB, host.addr, memfd, 0))
                == errno.EINVAL
            )
        finally:
            os.close(memfd)
        bad = os.open(os.devnull, os.O_RDONLY)
        os.close(bad)
        assert errno_of(lambda: vm.set_user_memory_region2(4, gm, 96 * MiB, 2 * MiB, host.addr, bad, 0)) == errno.EBADF
        assert errno_of(lambda: vm.set_user_memory_region(5, gm, 128 * MiB, 2 * MiB, host.addr)) == errno.EINVAL
    finally:
        vm.close()  # slots first, then the mapping behind them
        host.close()


def test_another_vms_guest_memfd_is_refused(kvm, vm):
    with kvm.create_vm() as other:
        fd = other.create_guest_memfd(2 * MiB, SHARED)
        with HostMemory.from_guest_memfd(fd, 2 * MiB) as host:
            rc = errno_of(lambda: vm.set_user_memory_region2(0, int(MemFlag.GUEST_MEMFD), 0, 2 * MiB, host.addr, fd, 0))
            assert rc == errno.EINVAL


# --- the policy layer: add_memory, discard, prefault ------------------------------------
def test_add_memory_binds_the_host_mapping(vm):
    region = vm.add_memory(0, 8 * MiB, "guest-memfd")
    assert region.flags == int(MemFlag.GUEST_MEMFD)
    assert region.host.backing is Backing.GUEST_MEMFD and region.host.fd >= 0
    assert os.fstat(region.host.fd).st_size == 8 * MiB
    with pytest.raises(ConfigError, match="READONLY"):
        vm.add_memory(16 * MiB, 2 * MiB, "guest-memfd", readonly=True)


@pytest.mark.parametrize("strategy", ["host", "auto"])
def test_prefault_populates_guest_memfd_through_its_mapping(vm, strategy):
    vm.add_memory(0, 16 * MiB, "guest-memfd")
    assert vm.memory.resident_bytes() == 0
    report = prefault_vm(vm, strategy=strategy)
    assert report.backing == "guest-memfd"
    assert report.resident_bytes == vm.memory.resident_bytes() == 16 * MiB


def test_host_data_reaches_the_guest_and_punched_pages_read_zero_on_both_sides():
    base, pages, hole = 2 * MiB, 256, (2 * MiB + 64 * PAGE, 32 * PAGE)
    after: dict[str, bytes] = {}

    def before_boot(machine: Machine) -> None:
        backend = machine.backend
        backend.memory.fill(base, pages * PAGE, 0xAA)
        backend.vm.discard(*hole)
        after["hole"] = backend.memory.read(*hole)

    config = MachineConfig.parse(
        image=str(ROOT / "guests/readpages64.elf"),
        mem="8M",
        memory="guest-memfd",
        backend="kvm",
        args={"base": hex(base), "pages": str(pages)},
        timeout=30,
    )
    result = Machine(config, before_boot=before_boot).run()
    assert result.status == 1, result.reason
    assert after["hole"] == bytes(hole[1])
    expected = (0xAAAAAAAAAAAAAAAA * (pages - hole[1] // PAGE)) & ((1 << 64) - 1)
    m = re.search(rb"checksum 0x([0-9a-f]+)", result.console)
    assert m and int(m[1], 16) == expected, result.console


def test_guest_writes_are_visible_to_the_host_through_the_mapping():
    seen: dict[int, int] = {}

    def after_run(machine: Machine) -> None:
        for gpa in range(4 * MiB, 8 * MiB, 64 * PAGE):
            seen[gpa] = machine.backend.memory.read_u64(gpa)

    config = MachineConfig.parse(
        image=str(ROOT / "guests/memtouch64.elf"),
        mem="8M",
        memory="guest-memfd",
        backend="kvm",
        prefault="host",
        args={"passes": "2"},
        timeout=30,
    )
    result = Machine(config, after_run=after_run).run()
    assert result.status == 1, result.reason
    assert seen and all(value == gpa + 1 for gpa, value in seen.items())  # the last pass (1) wrote gpa + 1
