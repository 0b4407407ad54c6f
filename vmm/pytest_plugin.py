"""pytest plugin for testing guest images with vmm (registered as ``pytest11: vmm``).

It probes the host lazily, once per session and never raising: only when a test uses one of
its markers or fixtures (a suite that uses neither never loads the VMM, never opens
/dev/kvm, and shows no ``vmm:`` line). Where a test's requirement is missing, the test is
skipped with the reason, at the test. It offers:

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
    ``--vmm-require-kvm``  fail, instead of skip, a test whose KVM or capability is missing
                           (a failure of that test, its body not run): for CI jobs that must
                           exercise the kernel path (the lab uses it)

The ``vmm: ...`` line saying what the probe found follows "collected N items" when some
collected test uses the plugin.
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
# Under --vmm-require-kvm: why this test must fail; it fails in its call phase, so pytest
# reports a FAILURE of the test rather than an ERROR in setup.
MISSING = pytest.StashKey[str]()
KVM_MARKERS = ("kvm", "requires_cap", "requires_vm_type")
MARKERS = (*KVM_MARKERS, "emulator")
FIXTURES = ("kvm", "vm", "vmm_backend", "machine_factory")


def host_probe(config: pytest.Config) -> HostProbe:
    """The session's :class:`HostProbe`, made the first time a test needs it."""
    probe = config.stash.get(PROBE, None)
    if probe is None:
        probe = config.stash[PROBE] = HostProbe.run()
    return probe


def uses_vmm(item: pytest.Item) -> bool:
    """Whether ``item`` has one of this plugin's markers or requests one of its fixtures
    (by definition, not by name: a suite's own ``vm`` fixture does not count)."""
    if any(item.get_closest_marker(name) is not None for name in MARKERS):
        return True
    info = getattr(item, "_fixtureinfo", None)
    defs: dict[str, Any] = getattr(info, "name2fixturedefs", None) or {}
    return any(_is_ours(defs.get(name, ())) for name in FIXTURES)


def _is_ours(chain: Any) -> bool:
    """Whether the fixture that serves a name is this plugin's, or overrides it and requests
    it (``chain`` is pytest's list of definitions for one name, the one in force last)."""
    for fixturedef in reversed(chain):
        if getattr(getattr(fixturedef, "func", None), "__module__", None) == __name__:
            return True
        if fixturedef.argname not in getattr(fixturedef, "argnames", ()):
            return False  # an override that does not build on ours
    return False


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


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> str | None:
    """``vmm: <what the probe found>``, only when a collected test uses the plugin."""
    if not any(uses_vmm(item) for item in items):
        return None
    return f"vmm: {host_probe(config).describe()}"


def _selected_backends(config: pytest.Config) -> list[str]:
    choice = config.getoption("--vmm-backend") or config.getini("vmm_backend") or "all"
    if choice == "all":
        return ["kvm", "emulator"]
    if choice == "auto":
        return ["kvm" if host_probe(config).kvm_usable else "emulator"]
    return [choice]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "vmm_backend" in metafunc.fixturenames:
        metafunc.parametrize("vmm_backend", _selected_backends(metafunc.config), indirect=True)


def _skip_reason(config: pytest.Config, item: pytest.Item) -> str | None:
    """Why a KVM marker (kvm, requires_cap, requires_vm_type) of ``item`` is not met here."""
    if not any(item.get_closest_marker(name) is not None for name in KVM_MARKERS):
        return None  # no probe for a test without these markers
    probe = host_probe(config)
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
    return None


def _emulator_reason(config: pytest.Config, item: pytest.Item) -> str | None:
    if item.get_closest_marker("emulator") is None:
        return None
    probe = host_probe(config)
    return None if probe.emulator_usable else f"requires the emulator backend: {probe.emulator_reason}"


def _unavailable(node: pytest.Item, reason: str, *, kvm: bool = True) -> None:
    """Skip the test for ``reason``; under --vmm-require-kvm, when it is KVM that is
    missing, mark it to fail instead (the first reason found is the one reported)."""
    if kvm and node.config.getoption("--vmm-require-kvm"):
        node.stash.setdefault(MISSING, f"--vmm-require-kvm: {reason}")
        return
    pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = _skip_reason(item.config, item)
    if reason:
        _unavailable(item, reason)
    reason = _emulator_reason(item.config, item)
    if reason:
        _unavailable(item, reason, kvm=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # Before the test body: a test whose KVM is missing under --vmm-require-kvm fails here.
    reason = item.stash.get(MISSING, None)
    if reason is not None:
        pytest.fail(reason, pytrace=False)


def _missing(request: pytest.FixtureRequest) -> bool:
    return MISSING in request.node.stash


@pytest.fixture
def vmm_backend(request: pytest.FixtureRequest) -> str:
    """The backend this test runs on (parametrized by --vmm-backend); skips where unusable."""
    name: str = getattr(request, "param", None) or _selected_backends(request.config)[0]
    probe = host_probe(request.config)
    if name == "kvm" and not probe.kvm_usable:
        _unavailable(request.node, f"backend kvm: requires /dev/kvm: {probe.kvm_reason}")
    if name == "emulator" and not probe.emulator_usable:
        _unavailable(request.node, f"backend emulator: {probe.emulator_reason}", kvm=False)
    return name


@pytest.fixture
def kvm(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A /dev/kvm system handle; skips the test where KVM is unusable (None, and the test
    fails before its body, under --vmm-require-kvm)."""
    probe = host_probe(request.config)
    if not probe.kvm_usable:
        _unavailable(request.node, f"requires /dev/kvm: {probe.kvm_reason}")
    if _missing(request):
        yield None
        return
    from vmm.kvm import Kvm

    with Kvm() as handle:
        yield handle


@pytest.fixture
def vm(request: pytest.FixtureRequest, kvm: Any) -> Iterator[Any]:
    """A default-type VM with 64 MiB of anonymous RAM at guest-physical 0 (slot 0)."""
    if kvm is None or _missing(request):
        yield None
        return
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
        probe = host_probe(request.config)
        if default_backend == "kvm" and not probe.kvm_usable:
            if request.config.getoption("--vmm-require-kvm"):
                _unavailable(request.node, f"machine_factory on kvm: requires /dev/kvm: {probe.kvm_reason}")
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
