"""pytest plugin for testing guest images with vmm (registered as ``pytest11: vmm``).

It probes the host once per session (never raising) and offers:

markers
    ``kvm``                    needs a usable /dev/kvm; skipped with the reason otherwise
    ``requires_cap(name)``     needs KVM capability ``name`` (e.g. ``"PRE_FAULT_MEMORY"``) to be
                               non-zero; skipped naming ``KVM_CAP_<name>`` otherwise
    ``requires_vm_type(name)`` needs KVM to accept VM type ``name`` (e.g. ``"SW_PROTECTED"``),
                               by KVM_CAP_VM_TYPES; skipped naming the type otherwise
    ``emulator``               needs the in-process emulator backend (the unicorn package)

fixtures
    ``kvm``              a :class:`vmm.Kvm` system handle (closed after the test)
    ``vm``               a :class:`vmm.Vm` with 64 MiB of RAM at guest-physical 0
    ``vmm_backend``      the backend name for this test; a test that asks for it is run once
                         per backend selected by ``--vmm-backend`` (default: all backends,
                         each skipped where unusable)
    ``machine_factory``  ``machine_factory(image, before_boot=None, after_run=None,
                         **MachineConfig options) -> RunResult``: builds, runs and tears down
                         a machine on the test's backend; the hooks get the Machine before
                         its vCPUs start and after they stop (guest RAM still mapped);
                         ``image`` is a file or a bundled guest's name (``"hello64"``)
    ``vmm_guest``        ``vmm_guest("hello64") -> Path``: a bundled guest image
                         (:mod:`vmm.guests`)

options
    ``--vmm-backend {auto,kvm,emulator,all}`` (ini: ``vmm_backend``)
    ``--vmm-require-kvm``  fail, instead of skip, a test whose KVM or capability is missing:
                           for CI jobs that must exercise the kernel path (the lab uses it)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BACKEND_HELP = (
    "backends for tests that use the vmm_backend fixture: kvm, emulator, all (each where usable), "
    "or auto (kvm if usable, else emulator). Default: all"
)
BACKEND_CHOICES = ("auto", "kvm", "emulator", "all")
REQUIRE_HELP = "fail (not skip) tests marked kvm or requires_cap(...) when this host lacks what they need"


@dataclass
class HostProbe:
    """What this host offers, found once per session; never raises."""

    kvm_usable: bool = False
    kvm_reason: str = "not probed"
    caps: dict[str, int] = field(default_factory=dict)
    emulator_usable: bool = False
    emulator_reason: str = "not probed"

    @classmethod
    def run(cls) -> HostProbe:
        probe = cls()
        try:
            from vmm.backends import kvm_usable

            probe.kvm_usable, probe.kvm_reason = kvm_usable()
            if probe.kvm_usable:
                from kvm_abi import Cap
                from vmm.kvm import Kvm

                # Ask a default VM, not /dev/kvm: tests run on a VM, and some answers differ
                # per VM (6.12 reports GUEST_MEMFD 1 on /dev/kvm but 0 on a default VM).
                with Kvm() as kvm, kvm.create_vm() as vm:
                    per_vm = kvm.check_extension(Cap.CHECK_EXTENSION_VM) > 0
                    probe.caps = {c.name: (vm if per_vm else kvm).check_extension(c) for c in Cap}
        except Exception as e:  # a probe must never break collection
            probe.kvm_usable, probe.kvm_reason = False, f"probe failed: {e}"
        try:
            from vmm.backends import emulator_usable

            probe.emulator_usable, probe.emulator_reason = emulator_usable()
        except Exception as e:
            probe.emulator_usable, probe.emulator_reason = False, f"emulator backend unavailable: {e}"
        return probe

    def describe(self) -> str:
        kvm = (
            f"kvm usable ({os.environ.get('VMM_KVM_DEVICE') or '/dev/kvm'}, "
            f"PRE_FAULT_MEMORY={self.caps.get('PRE_FAULT_MEMORY', 0)})"
            if self.kvm_usable
            else f"no kvm ({self.kvm_reason})"
        )
        emu = "emulator usable" if self.emulator_usable else f"no emulator ({self.emulator_reason})"
        return f"{kvm}; {emu}"

    def has_cap(self, name: str) -> bool:
        return bool(self.caps.get(name.removeprefix("KVM_CAP_"), 0))


PROBE = pytest.StashKey[HostProbe]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmm", "vmm guest testing")
    group.addoption("--vmm-backend", choices=BACKEND_CHOICES, default=None, help=BACKEND_HELP)
    parser.addini("vmm_backend", BACKEND_HELP, default="all")
    group.addoption("--vmm-require-kvm", action="store_true", default=False, help=REQUIRE_HELP)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm; skipped with the reason otherwise")
    config.addinivalue_line(
        "markers", "requires_cap(name): needs KVM capability `name` (e.g. 'PRE_FAULT_MEMORY') to be non-zero"
    )
    config.addinivalue_line(
        "markers", "requires_vm_type(name): needs KVM to accept VM type `name` (e.g. 'SW_PROTECTED')"
    )
    config.addinivalue_line("markers", "emulator: needs the in-process emulator backend (unicorn)")
    config.stash[PROBE] = HostProbe.run()


def pytest_report_header(config: pytest.Config) -> str:
    return f"vmm: {config.stash[PROBE].describe()}"


def _selected_backends(config: pytest.Config) -> list[str]:
    choice = config.getoption("--vmm-backend") or config.getini("vmm_backend") or "all"
    if choice == "all":
        return ["kvm", "emulator"]
    if choice == "auto":
        return ["kvm" if config.stash[PROBE].kvm_usable else "emulator"]
    return [choice]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "vmm_backend" in metafunc.fixturenames:
        metafunc.parametrize("vmm_backend", _selected_backends(metafunc.config), indirect=True)


def _skip_reason(probe: HostProbe, item: pytest.Item) -> str | None:
    if item.get_closest_marker("kvm") and not probe.kvm_usable:
        return f"requires /dev/kvm: {probe.kvm_reason}"
    for mark in item.iter_markers("requires_cap"):
        name = str(mark.args[0]).removeprefix("KVM_CAP_")
        if not probe.kvm_usable:
            return f"requires KVM_CAP_{name}: no usable KVM ({probe.kvm_reason})"
        if not probe.has_cap(name):
            return f"requires KVM_CAP_{name} (this kernel reports {probe.caps.get(name, 0)})"
    for mark in item.iter_markers("requires_vm_type"):
        name = str(mark.args[0]).upper()
        from kvm_abi import VmType

        if not probe.kvm_usable:
            return f"requires VM type {name}: no usable KVM ({probe.kvm_reason})"
        if not probe.caps.get("VM_TYPES", 0) & (1 << VmType[name]):
            return f"requires VM type {name} (KVM_CAP_VM_TYPES is {probe.caps.get('VM_TYPES', 0):#x} here)"
    if item.get_closest_marker("emulator") and not probe.emulator_usable:
        return f"requires the emulator backend: {probe.emulator_reason}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = _skip_reason(item.config.stash[PROBE], item)
    if reason:
        if item.config.getoption("--vmm-require-kvm") and "emulator" not in reason:
            pytest.fail(f"--vmm-require-kvm: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def vmm_backend(request: pytest.FixtureRequest) -> str:
    """The backend this test runs on (parametrized by --vmm-backend); skips where unusable."""
    name: str = getattr(request, "param", None) or _selected_backends(request.config)[0]
    probe = request.config.stash[PROBE]
    if name == "kvm" and not probe.kvm_usable:
        pytest.skip(f"backend kvm: requires /dev/kvm: {probe.kvm_reason}")
    if name == "emulator" and not probe.emulator_usable:
        pytest.skip(f"backend emulator: {probe.emulator_reason}")
    return name


@pytest.fixture
def kvm(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A /dev/kvm system handle; skips the test where KVM is unusable."""
    probe = request.config.stash[PROBE]
    if not probe.kvm_usable:
        pytest.skip(f"requires /dev/kvm: {probe.kvm_reason}")
    from vmm.kvm import Kvm

    with Kvm() as handle:
        yield handle


@pytest.fixture
def vm(kvm: Any) -> Iterator[Any]:
    """A default-type VM with 64 MiB of anonymous RAM at guest-physical 0 (slot 0)."""
    with kvm.create_vm() as machine_vm:
        machine_vm.add_memory(0, 64 << 20, "anon")
        yield machine_vm


@pytest.fixture
def machine_factory(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``machine_factory(image, **options) -> RunResult`` on this test's backend (the
    ``vmm_backend`` parameter if the test uses it, else --vmm-backend's first choice)."""
    from vmm import guests
    from vmm.config import MachineConfig
    from vmm.machine import Machine

    if "vmm_backend" in request.fixturenames:
        default_backend = request.getfixturevalue("vmm_backend")
    else:
        default_backend = _selected_backends(request.config)[0]
        if default_backend == "kvm" and not request.config.stash[PROBE].kvm_usable:
            default_backend = "emulator"

    def factory(
        image: str,
        *,
        before_boot: Callable[[Any], None] | None = None,
        after_run: Callable[[Any], None] | None = None,
        **options: Any,
    ) -> Any:
        options.setdefault("backend", default_backend)
        options.setdefault("timeout", 30)
        machine = Machine(
            MachineConfig.parse(image=guests.resolve(str(image)), **options),
            before_boot=before_boot,
            after_run=after_run,
        )
        return machine.run()

    return factory


@pytest.fixture
def vmm_guest() -> Callable[[str], Path]:
    """``vmm_guest("hello64") -> Path``: a guest image bundled with vmm, by name (suffix
    optional; ``"pc/mbinfo"`` for the PC-convention ones), wherever vmm is installed."""
    from vmm import guests

    return guests.path
