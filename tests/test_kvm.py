"""Kvm, Vm and Vcpu against this host's real /dev/kvm (kvm-abi.md §9-E)."""

from __future__ import annotations

import errno
import os
import threading

import pytest

import kvm_abi as abi
from kvm_abi import Cap, KvmError, ffi
from vmm import exits as ex
from vmm.errors import Unavailable
from vmm.kvm import Kvm

pytestmark = pytest.mark.kvm

# Real mode at 0x1000: mov dx,0x3f8; mov al,'A'; out dx,al; mov ax,0x2000; mov ds,ax;
# mov byte [0],0x55; mov al,[0x10]; out 0x11,al; hlt   (kvm-abi.md §9-E 37)
REAL_MODE_PROGRAM = bytes.fromhex("baf803b041ee b80020 8ed8 c606000055 a01000 e611 f4")


def real_mode_vcpu(vm, code: bytes, at: int = 0x1000):
    vm.memory.write(at, code)
    vcpu = vm.create_vcpu(len(vm.vcpus))
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = at, 2
    vcpu.set_regs(regs)
    return vcpu


def test_api_version_mmap_size_and_vm_types(kvm):
    assert kvm.get_api_version() == 12
    assert kvm.get_vcpu_mmap_size() == 3 * 4096
    with kvm.create_vm(0) as vm:
        assert vm.fd >= 0
    with pytest.raises(KvmError) as info:
        kvm.create_vm(0x7F)
    assert info.value.errno == errno.EINVAL
    assert info.value.ioctl == "KVM_CREATE_VM"


def test_missing_device_is_unavailable_with_a_hint(tmp_path):
    with pytest.raises(Unavailable) as info:
        Kvm(str(tmp_path / "kvm"))
    assert "no such device" in str(info.value)


def test_a_file_that_is_not_kvm_is_refused(tmp_path):
    fake = tmp_path / "not-kvm"
    fake.write_bytes(b"")
    with pytest.raises(Unavailable) as info:
        Kvm(str(fake))
    assert "not a KVM device" in str(info.value)


def test_capabilities_by_name(kvm):
    caps = kvm.capabilities()
    assert caps["USER_MEMORY"] == 1
    assert set(caps) == {c.name for c in Cap}
    # The oracle is the raw ioctl on the system fd, not another Kvm method.
    for name in ("PRE_FAULT_MEMORY", "NR_MEMSLOTS", "GUEST_MEMFD_FLAGS"):
        assert caps[name] == abi.ioctl(kvm.fd, abi.KVM_CHECK_EXTENSION, int(Cap[name])), name


def test_memslot_errors(kvm):
    with kvm.create_vm() as vm:
        region = vm.add_memory(0x10000, 0x10000, "anon")
        addr = region.host.addr
        with pytest.raises(KvmError) as overlap:
            vm.set_user_memory_region(5, 0, 0x10000, 0x1000, addr)
        assert overlap.value.errno == errno.EEXIST
        with pytest.raises(KvmError) as unaligned:
            vm.set_user_memory_region(6, 0, 0x100800, 0x1000, addr)
        assert unaligned.value.errno == errno.EINVAL
        with pytest.raises(KvmError) as missing:
            vm.set_user_memory_region(7, 0, 0, 0, 0)
        assert missing.value.errno == errno.EINVAL
        nslots = kvm.check_extension(Cap.NR_MEMSLOTS)
        with pytest.raises(KvmError) as too_high:
            vm.set_user_memory_region(nslots, 0, 0x200000, 0x1000, addr)
        assert too_high.value.errno == errno.EINVAL
        assert "slot=" in str(too_high.value)


def test_real_mode_exits_io_mmio_hlt(vm):
    vcpu = real_mode_vcpu(vm, REAL_MODE_PROGRAM)
    first = vcpu.run()
    assert isinstance(first, ex.IoOut)
    assert (first.port, first.size, first.count, bytes(first.data)) == (0x3F8, 1, 1, b"A")
    assert vcpu.run_struct.io.data_offset == 4096
    # RAM ends at 64 MiB in the fixture, so 0x20000 is RAM: the store lands there.
    second = vcpu.run()
    assert isinstance(second, ex.IoOut) and second.port == 0x11
    assert vm.memory.read(0x20000, 1) == b"\x55"
    assert vcpu.run() is ex.HLT
    assert vcpu.get_regs().rip == 0x1000 + len(REAL_MODE_PROGRAM)


def test_mmio_write_and_read_completion(kvm):
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000, "anon")  # 0x20000 is not RAM: MMIO exits
        vcpu = real_mode_vcpu(vm, REAL_MODE_PROGRAM)
        assert isinstance(vcpu.run(), ex.IoOut)
        store = vcpu.run()
        assert isinstance(store, ex.MmioWrite)
        assert (store.addr, bytes(store.data)) == (0x20000, b"\x55")
        load = vcpu.run()
        assert isinstance(load, ex.MmioRead) and load.addr == 0x20010 and len(load.data) == 1
        load.data[0] = 0x77  # completes on the next KVM_RUN
        out = vcpu.run()
        assert isinstance(out, ex.IoOut) and out.port == 0x11 and bytes(out.data) == b"\x77"
        assert vcpu.run() is ex.HLT


def test_immediate_exit_returns_interrupted_and_clears_the_flag(vm):
    vcpu = real_mode_vcpu(vm, REAL_MODE_PROGRAM)
    vcpu.run_struct.immediate_exit = 1
    assert vcpu.run() is ex.INTERRUPTED
    assert vcpu.run_struct.immediate_exit == 0
    assert isinstance(vcpu.run(), ex.IoOut)  # and the guest continues normally


def test_kick_stops_a_vcpu_spinning_inside_kvm_run(vm):
    vcpu = real_mode_vcpu(vm, bytes.fromhex("ebfe"))  # jmp $
    result: list[object] = []
    ready = threading.Event()

    def spin() -> None:
        vcpu.bind_thread()
        ready.set()
        result.append(vcpu.run())
        vcpu.unbind_thread()

    from vmm.vcpu import ensure_kick_handler

    assert ensure_kick_handler()
    t = threading.Thread(target=spin)
    t.start()
    ready.wait()
    vcpu.kick()
    t.join(5)
    assert not t.is_alive(), "kick did not interrupt KVM_RUN"
    assert result == [ex.INTERRUPTED]


def test_supported_cpuid_e2big_then_full_table(kvm, vm):
    small = ffi.new("struct kvm_cpuid2 *", {"nent": 1, "entries": 1})
    with pytest.raises(KvmError) as info:
        abi.ioctl(kvm.fd, abi.KVM_GET_SUPPORTED_CPUID, small)
    assert info.value.errno == errno.E2BIG
    assert small.nent == 1
    table = kvm.get_supported_cpuid()
    assert 1 < table.nent <= 256
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(table)
    assert any(table.entries[i].function == 0 for i in range(table.nent))


def test_msrs_stop_at_the_first_bogus_one(kvm, vm):
    vcpu = vm.create_vcpu(0)
    assert vcpu.set_msrs({0x174: 0x10, 0x175: 0x2000, 0xDEADBEEF: 1}) == 2
    values = vcpu.get_msrs([0x174, 0xDEADBEEF])
    assert values == {0x174: 0x10}
    index = kvm.get_msr_index_list()
    assert len(index) > 10 and 0x174 in index


def test_msr_index_list_reports_its_size(kvm):
    probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
    with pytest.raises(KvmError) as info:
        abi.ioctl(kvm.fd, abi.KVM_GET_MSR_INDEX_LIST, probe)
    assert info.value.errno == errno.E2BIG
    assert probe.nmsrs == len(kvm.get_msr_index_list())


def test_interrupt_controller_ordering_rules(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as no_chip:
            vm.irq_line(4, 1)
        assert no_chip.value.errno == errno.ENXIO
        with pytest.raises(KvmError) as no_pit:
            vm.create_pit2()
        assert no_pit.value.errno == errno.ENOENT
        vm.create_irqchip()
        with pytest.raises(KvmError) as twice:
            vm.create_irqchip()
        assert twice.value.errno == errno.EEXIST
        vm.create_pit2()
        vm.irq_line(4, 1)
        vm.irq_line(4, 0)
    with kvm.create_vm() as vm:
        vm.create_vcpu(0)
        with pytest.raises(KvmError) as late:
            vm.create_irqchip()
        assert late.value.errno == errno.EINVAL
        with pytest.raises(KvmError) as late_map:
            vm.set_identity_map_addr()
        assert late_map.value.errno == errno.EINVAL


def test_tss_address_reaches_the_kernel_whole(kvm):
    # KVM_SET_TSS_ADDR takes the address as the ioctl's argument and needs its three pages
    # below 4 GiB (x86.c: addr <= (unsigned int)(-3 * PAGE_SIZE)). An address above INT_MAX
    # must pass (fcntl.ioctl could not), and one above 32 bits must reach the kernel
    # untruncated: cut to an int it would read as 0 and be accepted.
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.set_tss_addr(0xFFFFD000)  # the last three pages below 4 GiB
        for addr in (0xFFFFE000, 1 << 33):
            with pytest.raises(KvmError) as info:
                vm.set_tss_addr(addr)
            assert (info.value.errno, info.value.ioctl) == (errno.EINVAL, "KVM_SET_TSS_ADDR"), hex(addr)


def test_real_mode_runs_after_the_tss_and_identity_map_are_placed(kvm):
    with kvm.create_vm() as vm:
        vm.set_identity_map_addr()
        vm.set_tss_addr()
        vm.add_memory(0, 1 << 20, "anon")
        vcpu = real_mode_vcpu(vm, bytes.fromhex("b041e6f4f4"))  # mov al,'A'; out 0xf4,al; hlt
        first = vcpu.run()
        assert isinstance(first, ex.IoOut) and (first.port, bytes(first.data)) == (0xF4, b"A")
        assert vcpu.run() is ex.HLT


def test_dirty_log(kvm):
    with kvm.create_vm() as vm:
        region = vm.add_memory(0, 0x10000, "anon")
        bitmap = ffi.new("uint64_t[1]")
        with pytest.raises(KvmError) as info:
            vm.get_dirty_log(region.slot, bitmap)
        assert info.value.errno == errno.ENOENT
    with kvm.create_vm() as vm:
        host_region = vm.add_memory(0, 0x100000, "anon")
        vm.set_user_memory_region(
            host_region.slot, int(abi.MemFlag.LOG_DIRTY_PAGES), 0, 0x100000, host_region.host.addr
        )
        # mov byte [0x3000], 1 ; mov byte [0x5000], 1 ; hlt  (real mode, DS = 0)
        vcpu = real_mode_vcpu(vm, bytes.fromhex("c606003001 c606005001 f4"))
        assert vcpu.run() is ex.HLT
        bitmap = ffi.new("uint64_t[4]")
        vm.get_dirty_log(host_region.slot, bitmap)
        assert bitmap[0] & (1 << 3) and bitmap[0] & (1 << 5)


def test_duplicate_vcpu_id(vm):
    vm.create_vcpu(0)
    with pytest.raises(KvmError) as info:
        vm.create_vcpu(0)
    assert info.value.errno == errno.EEXIST


def test_mp_state_and_fpu(vm):
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_mp_state() == abi.MpState.RUNNABLE
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    vcpu.set_fpu(fpu)
    assert vcpu.get_fpu().fcw == 0x37F


def test_guest_debug_single_steps_and_turns_off(vm):
    vcpu = real_mode_vcpu(vm, REAL_MODE_PROGRAM)
    vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)
    # One #DB (vector 1) exit after each instruction: mov dx,0x3f8 (3 bytes), mov al,'A' (2).
    assert vcpu.run() == ex.Debug(1, 0x1003)
    assert vcpu.run() == ex.Debug(1, 0x1005)
    vcpu.set_guest_debug(0)
    # Off again: the program runs from exit to exit, with no debug exit in between.
    out = vcpu.run()
    assert isinstance(out, ex.IoOut) and (out.port, bytes(out.data)) == (0x3F8, b"A")
    second = vcpu.run()
    assert isinstance(second, ex.IoOut) and second.port == 0x11
    assert vcpu.run() is ex.HLT


def test_vm_ioctls_from_a_forked_child_fail_with_eio(vm):
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish work, then _exit with a verdict
        try:
            vm.check_extension(Cap.USER_MEMORY)
            os._exit(1)
        except KvmError as e:
            os._exit(0 if e.errno == errno.EIO else 2)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_objects_close_deterministically(kvm):
    vm = kvm.create_vm()
    vm.add_memory(0, 0x100000, "thp")
    vcpu = vm.create_vcpu(0)
    fds = (vm.fd, vcpu.fd)
    vm.close()
    vm.close()  # idempotent
    for fd in fds:
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
    assert len(vm.memory) == 0
