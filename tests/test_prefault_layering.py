"""The layering DESIGN.md promises, for pre-population: ``Vm``/``Vcpu``/``Kvm`` are
mechanism and never import pre-population (not even lazily inside a method), and
``vmm.prefault`` never imports the layers above it. Read from the sources, so a lazy
import inside a function body counts as much as one at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VMM = ROOT / "vmm"

# What sits above the kernel objects (DESIGN.md: cli -> machine -> (loader, platform,
# devices, cpu, prefault, backends) -> (vm, vcpu, exits, memory) -> kvm_abi).
ABOVE_PREFAULT = ("vmm.machine", "vmm.backends", "vmm.cli", "vmm.config", "vmm.pytest_plugin", "vmm.result")
ABOVE_KERNEL_OBJECTS = (
    *ABOVE_PREFAULT,
    "vmm.prefault",
    "vmm.loader",
    "vmm.platform",
    "vmm.devices",
    "vmm.cpu",
)


def imported_modules(path: Path) -> set[str]:
    """Every module (and ``module.name``) ``path`` imports, anywhere in it: in functions
    and TYPE_CHECKING blocks too. The project imports absolutely only."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def offending(imports: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imports if any(m == f or m.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("name", ["kvm.py", "vm.py", "vcpu.py"])
def test_kernel_objects_import_nothing_above_them(name):
    imports = imported_modules(VMM / name)
    assert "kvm_abi" in imports  # the reader sees this module's imports at all
    assert offending(imports, ABOVE_KERNEL_OBJECTS) == []


@pytest.mark.parametrize("path", sorted((VMM / "prefault").glob("*.py")), ids=lambda p: p.name)
def test_prefault_imports_nothing_above_it(path):
    imports = imported_modules(path)
    assert "__future__" in imports  # the reader sees this module's imports at all
    assert offending(imports, ABOVE_PREFAULT) == []
