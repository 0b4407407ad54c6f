"""The vmm pytest plugin, exercised the way a user's suite would use it (pytester)."""

from __future__ import annotations

import json
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
    result.assert_outcomes(failed=1)  # a failure of the test itself, not an error in its setup
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["--vmm-require-kvm: requires KVM_CAP_PRE_FAULT_MEMORY: no usable KVM*"])


def failures(reprec: pytest.HookRecorder) -> dict[str, str]:
    """Failed tests by name -> their message; each failed in its call phase (a FAILURE, not
    an ERROR in setup) and none erred."""
    _passed, _skipped, failed = reprec.listoutcomes()
    assert all(r.when == "call" for r in failed), [(r.nodeid, r.when) for r in failed]
    assert not [r for r in reprec.getreports("pytest_runtest_logreport") if r.failed and r.when != "call"]
    return {r.nodeid.split("::")[-1]: str(r.longrepr) for r in failed}


def test_require_kvm_fails_tests_whose_fixtures_need_kvm(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMM_KVM_DEVICE", "/nonexistent/kvm")
    pytester.makepyfile(
        """
        def test_kvm_fixture(kvm):
            raise AssertionError("the body must not run")

        def test_vm_fixture(vm):
            raise AssertionError("the body must not run")

        def test_each_backend(vmm_backend):
            assert vmm_backend == "emulator"  # the kvm parameter fails before its body

        @__import__("pytest").mark.emulator
        def test_emulator_only():
            pass
        """
    )
    reprec = pytester.inline_run("--vmm-require-kvm", "--vmm-backend", "all")
    reprec.assertoutcome(passed=2, failed=3)
    failed = failures(reprec)
    assert sorted(failed) == ["test_each_backend[kvm]", "test_kvm_fixture", "test_vm_fixture"]
    assert failed["test_kvm_fixture"].startswith("--vmm-require-kvm: requires /dev/kvm: /nonexistent/kvm")
    assert failed["test_vm_fixture"].startswith("--vmm-require-kvm: requires /dev/kvm: /nonexistent/kvm")
    assert failed["test_each_backend[kvm]"].startswith("--vmm-require-kvm: backend kvm: requires /dev/kvm")
    assert not [m for m in failed.values() if "AssertionError" in m]  # no body ran


# A conftest for a user's project: records which of vmm's modules its pytest run imported.
RECORD_MODULES = """
import json
import sys

def pytest_sessionfinish(session):
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("vmm", "kvm_abi", "unicorn", "_cffi_backend"))
    with open("modules.json", "w") as f:
        json.dump(loaded, f)
"""
MACHINERY = {"kvm_abi", "vmm.kvm", "vmm.vm", "vmm.machine", "vmm.backends", "vmm.memory", "unicorn"}


def test_a_suite_that_does_not_use_the_plugin_never_loads_the_vmm(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECORD_MODULES)
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def vm():  # the project's own fixture of the same name: not the plugin's
            return "mine"

        def test_own_vm(vm):
            assert vm == "mine"

        def test_plain():
            assert True
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2)
    assert not [line for line in result.outlines if line.startswith("vmm:")], result.stdout.str()
    loaded = set(json.loads((pytester.path / "modules.json").read_text()))
    assert "vmm.pytest_plugin" in loaded  # the plugin was there (entry point) ...
    assert not loaded & MACHINERY, sorted(loaded & MACHINERY)  # ... and probed nothing


def test_a_suite_that_uses_a_fixture_gets_the_probe_and_the_machine(pytester: pytest.Pytester, guest) -> None:
    pytester.makeconftest(RECORD_MODULES)
    pytester.makepyfile(
        f"""
        def test_plain():
            assert True

        def test_run_guest(machine_factory):
            result = machine_factory({guest("hello64.elf")!r}, mem="16M")
            assert result.status == 1 and result.console == b"hello from long mode\\n"
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["collected 2 items", "vmm: *kvm*; *emulator*"])
    loaded = set(json.loads((pytester.path / "modules.json").read_text()))
    assert {"vmm.machine", "kvm_abi"} <= loaded
