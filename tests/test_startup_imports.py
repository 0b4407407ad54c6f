"""Start-up imports only what a run needs (issue 13): checked on ``sys.modules`` of a fresh
interpreter, never on time. The public names of ``vmm`` stay importable all the same."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import GUESTS, ROOT

# Never needed by `vmm run FILE` of a small image on KVM: the pre-population machinery, the
# emulator and its CPU library, psutil, pyelftools, the Linux boot protocol, the
# statistics module of `vmm prefault`, OpenSSL's hashlib, the JSON module, the bundled
# guests' resource machinery.
NOT_ON_THE_KVM_PATH = (
    "vmm.prefault",
    "vmm.backends.emulator",
    "unicorn",
    "psutil",
    "elftools",
    "vmm.loader.linux",
    "vmm.loader.pvh",
    "statistics",
    "_hashlib",
    "json",  # only for --json
    "importlib.resources",  # only to look up a bundled guest by name
    "tempfile",
    "vmm.cli.prefault",  # the other subcommands' parsers are not built for `vmm run`
    "vmm.cli.qemu",
)
# cffi's Python package is needed only in ABI mode; the compiled module brings its own ffi.
NOT_WHEN_COMPILED = ("cffi",)

# Reports without importing anything itself (json would hide whether vmm imported it).
PROBE = """
import sys
from vmm.cli import main
status = main(sys.argv[1:])
print("--- modules", status, *sorted(sys.modules), sep="\\n", file=sys.stderr)
"""


def _unwanted(modules: set[str]) -> list[str]:
    import kvm_abi

    names = NOT_ON_THE_KVM_PATH + (NOT_WHEN_COMPILED if kvm_abi.COMPILED else ())
    return [m for m in names if m in modules]


def _modules_after(*argv: str, env: dict[str, str] | None = None) -> tuple[int, set[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env
    )
    _, _, tail = proc.stderr.partition("--- modules\n")
    status, *modules = tail.splitlines()
    return int(status), set(modules)


def test_public_names_are_importable():
    import vmm

    for name in vmm.__all__:
        assert getattr(vmm, name) is not None, name
    from vmm import Kvm, Machine, MachineConfig, RunResult

    assert Machine.__name__ == "Machine" and MachineConfig.__name__ == "MachineConfig"
    assert Kvm.__module__ == "vmm.kvm" and RunResult.__module__ == "vmm.result"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        vmm.nothing  # noqa: B018


def test_import_vmm_loads_no_submodule():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, vmm; print(sorted(m for m in sys.modules if m.startswith('vmm.')))"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_bad_input_imports_no_machinery():
    status, modules = _modules_after("run", "-q", "--mem", "0", str(GUESTS / "hello64.elf"))
    assert status == 2
    loaded = _unwanted(modules)
    assert loaded == [], f"a refused config imported {loaded}"


@pytest.mark.kvm
@pytest.mark.parametrize("image", ["hello64.elf", "pc/mbinfo.elf"])
def test_a_kvm_run_imports_only_what_it_needs(image):
    status, modules = _modules_after("run", "-q", "--backend", "kvm", str(GUESTS / image))
    assert status == 1  # the guest wrote 0 to the exit port
    loaded = _unwanted(modules)
    assert loaded == [], f"`vmm run {image}` imported {loaded}"
    assert "vmm.backends.kvm" in modules


def test_the_emulator_run_uses_the_emulator():
    env = {"VMM_KVM_DEVICE": "/nonexistent/kvm", "PATH": "/usr/bin:/bin"}
    status, modules = _modules_after("run", "-q", str(GUESTS / "hello64.elf"), env=env)
    assert status == 1
    assert "vmm.backends.emulator" in modules and "vmm.prefault" not in modules


def test_the_plan_of_an_unchanged_image_is_reused(tmp_path):
    import os
    import shutil

    from vmm.cpu.layout import BootLayout
    from vmm.loader import plan_image

    image = tmp_path / "hello64.elf"
    shutil.copyfile(GUESTS / "hello64.elf", image)
    ram = BootLayout.ram_ranges(64 << 20)
    first = plan_image(image, ram)
    assert plan_image(image, ram) is first  # the same file and arguments: planned once
    assert plan_image(image, BootLayout.ram_ranges(32 << 20)) is not first  # other arguments
    data = bytearray(image.read_bytes())
    entry_offset = 24  # e_entry of the ELF64 header
    data[entry_offset : entry_offset + 8] = (first.entry + 1).to_bytes(8, "little")
    image.write_bytes(bytes(data))  # rewritten in place, maybe within the same mtime tick
    changed = plan_image(image, ram)
    assert changed is not first and changed.entry == first.entry + 1
    os.unlink(image)
    os.mkfifo(image)  # no longer a regular file: refused, never a stale plan
    from vmm.errors import InputError

    with pytest.raises(InputError, match="is a FIFO"):
        plan_image(image, ram)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_cli_leaves_the_cyclic_gc_as_it_found_it(enabled):
    import gc

    from vmm.cli import main

    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        assert main(["run", "-q", "--mem", "0", str(GUESTS / "hello64.elf")]) == 2
        assert main(["nonsense"]) == 2
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.kvm
def test_the_guest_runs_with_the_cyclic_gc_on():
    code = (
        "import gc, sys\n"
        "import vmm.machine as m\n"
        "seen = []\n"
        "orig = m.Machine._run_built\n"
        "def run_built(self, *a):\n"
        "    seen.append(gc.isenabled())\n"
        "    return orig(self, *a)\n"
        "m.Machine._run_built = run_built\n"
        "from vmm.cli import main\n"
        "status = main(['run', '-q', '--backend', 'kvm', sys.argv[1]])\n"
        "print(status, seen, gc.isenabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(GUESTS / "hello64.elf")], capture_output=True, text=True)
    assert out.stdout.split("\n")[-2] == "1 [True] True", out.stdout + out.stderr
