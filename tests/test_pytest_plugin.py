"""The vmm pytest plugin, exercised the way a user's suite would use it (pytester)."""

from __future__ import annotations

import os

import pytest

import kvm_abi as abi

pytest_plugins = ["pytester"]


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.kvm:*", "*@pytest.mark.requires_cap(name):*", "*@pytest.mark.emulator:*"]
    )


def test_missing_kvm_skips_with_the_reason(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMM_KVM_DEVICE", "/nonexistent/kvm")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.kvm
        def test_needs_kvm():
            raise AssertionError("must not run")

        @pytest.mark.requires_cap("PRE_FAULT_MEMORY")
        def test_needs_prefault():
            raise AssertionError("must not run")

        def test_kvm_fixture(kvm):
            raise AssertionError("must not run")
        """
    )
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(
        [
            "*requires /dev/kvm: /nonexistent/kvm: no such device*",
            "*requires KVM_CAP_PRE_FAULT_MEMORY: no usable KVM*",
        ]
    )


def vm_capability(number: int) -> int:
    """KVM_CHECK_EXTENSION on a default VM, by raw ioctls on the device: the oracle for what
    the plugin (which asks through vmm.Kvm) must conclude, independent of vmm."""
    kvm_fd = os.open(os.environ.get("VMM_KVM_DEVICE") or "/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        vm_fd = abi.ioctl(kvm_fd, abi.KVM_CREATE_VM, 0)
        try:
            return abi.ioctl(vm_fd, abi.KVM_CHECK_EXTENSION, number)
        finally:
            os.close(vm_fd)
    finally:
        os.close(kvm_fd)


@pytest.mark.kvm
def test_capability_markers_follow_the_kernel(pytester: pytest.Pytester) -> None:
    prefault = vm_capability(236)  # KVM_CAP_PRE_FAULT_MEMORY, include/uapi/linux/kvm.h
    assert vm_capability(3) == 1  # KVM_CAP_USER_MEMORY: every KVM has it
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_cap("USER_MEMORY")
        def test_user_memory(kvm):
            assert kvm.check_extension(3) == 1

        @pytest.mark.requires_cap("KVM_CAP_PRE_FAULT_MEMORY")
        def test_prefault(kvm):
            assert kvm.check_extension(236) > 0
        """
    )
    result = pytester.runpytest("-rs")
    if prefault > 0:
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines([f"*requires KVM_CAP_PRE_FAULT_MEMORY (this kernel reports {prefault})*"])


@pytest.mark.kvm
def test_machine_factory_and_vm_fixtures(pytester: pytest.Pytester, guest) -> None:
    pytester.makepyfile(
        f"""
        def test_run_guest(machine_factory):
            result = machine_factory({guest("hello64.elf")!r}, mem="16M")
            assert result.console == b"hello from long mode\\n"
            assert result.status == 1

        def test_vm_has_ram(vm):
            assert vm.memory.total_size == 64 << 20
        """
    )
    result = pytester.runpytest("--vmm-backend", "kvm")
    result.assert_outcomes(passed=2)


def test_backend_parametrization_and_header(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_backend(vmm_backend):
            assert vmm_backend in ("kvm", "emulator")
        """
    )
    result = pytester.runpytest("--vmm-backend", "all", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_backend?kvm?*", "*test_backend?emulator?*"])
    header = pytester.runpytest("--vmm-backend", "kvm")
    header.stdout.fnmatch_lines(["vmm: *"])


def test_require_kvm_turns_skips_into_failures(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMM_KVM_DEVICE", "/nonexistent/kvm")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_cap("PRE_FAULT_MEMORY")
        def test_needs_prefault():
            pass
        """
    )
    result = pytester.runpytest("--vmm-require-kvm")
    result.assert_outcomes(errors=1)  # a failure in setup: reported as an error, exit status 1
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*--vmm-require-kvm: requires KVM_CAP_PRE_FAULT_MEMORY*"])
