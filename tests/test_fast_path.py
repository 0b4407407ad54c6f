"""The compiled fast path (``kvm_abi._kvm_cffi``): it agrees with its ABI-mode twin exit by
exit on the real KVM, it takes its constants from the Python tables, and a build older than
its C source is refused (issue 9, "The C fast path").

Run as a script (``python tests/test_fast_path.py``) it prints, as JSON, what
:func:`exit_codes` sees in that interpreter: the ABI-mode side of the comparison.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kvm_abi as abi
from kvm_abi import _cdefs

ROOT = Path(__file__).resolve().parent.parent

# Real mode at 0x1000 (as --32, .code16, ld -Ttext=0x1000 --oformat=binary):
#   mov $0x3f8,%dx; mov $'A',%al; out %al,(%dx)      one byte out to 0x3f8
#   mov $0x1234,%ax; out %ax,$0x80                   two bytes out to 0x80
#   mov $0x12345678,%eax; out %eax,$0x84             four bytes out to 0x84
#   in $0x61,%al                                     one byte in from 0x61
#   mov $0x1029,%di; mov $3,%cx; rep insb (%dx)      string in: one exit with count 3
#   mov $0x2000,%ax; mov %ax,%ds; movb $0x55,0x0     a store to 0x20000, not RAM: MMIO
#   hlt
#   .ascii "xyz"                                     (rep insb's buffer)
GUEST = bytes.fromhex("baf803b041ee b83412e780 66b87856341266e784 e461 bf2910b90300f36c b800208ed8c606000055 f4 78797a")
GUEST_AT = 0x1000
RAM = 0x10000  # so that 0x20000 is an MMIO address
INVALID_SYNC_REGS = 1 << 31  # no KVM_SYNC_X86_* bit: KVM_RUN answers EINVAL before entering the guest

# What run_vcpu returns, written out rather than computed with kvm_abi: a fast code is
# 1 << 32 | direction << 24 | size << 16 | port, with the data it saw in the PIO page.
EXPECTED: list[list[Any]] = [
    [-4, None],  # immediate_exit set: -EINTR
    [-22, None],  # invalid kvm_valid_regs: -EINVAL
    [0x1_0101_03F8, "41"],  # out, 1 byte, port 0x3f8
    [0x1_0102_0080, "3412"],  # out, 2 bytes, port 0x80
    [0x1_0104_0084, "78563412"],  # out, 4 bytes, port 0x84
    [0x1_0001_0061, ""],  # in, 1 byte, port 0x61 (the data is ours to fill)
    [2, None],  # KVM_EXIT_IO with count 3: not a single access, the general path
    [6, None],  # KVM_EXIT_MMIO
    [5, None],  # KVM_EXIT_HLT
]


def exit_codes(kvm: Any) -> list[list[Any]]:
    """Run GUEST on a fresh VM through Vm and Vcpu, calling ``kvm_abi.run_vcpu`` directly:
    ``[code, data]`` per call, data being the hex of the bytes an OUT left in the PIO page."""
    with kvm.create_vm() as vm:
        vm.add_memory(0, RAM, "anon")
        vm.memory.write(GUEST_AT, GUEST)
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = GUEST_AT, 2
        vcpu.set_regs(regs)
        run, page = vcpu.run_struct, vcpu.shared_page
        seen: list[list[Any]] = []

        def step() -> int:
            code = abi.run_vcpu(vcpu.fd, run)
            data = None
            if code > 0 and code & abi.FAST_IO:
                direction, size, _ = abi.fast_io_fields(code)
                out = direction == abi.KVM_EXIT_IO_OUT
                data = bytes(page[abi.PIO_DATA_OFFSET : abi.PIO_DATA_OFFSET + size]).hex() if out else ""
            seen.append([code, data])
            return code

        run.immediate_exit = 1
        step()
        run.immediate_exit = 0
        run.kvm_valid_regs = INVALID_SYNC_REGS
        step()
        run.kvm_valid_regs = 0
        for _ in range(len(EXPECTED)):  # bounded: a wrong code must not loop forever
            if step() in (abi.ExitReason.HLT, abi.ExitReason.SHUTDOWN, abi.ExitReason.INTERNAL_ERROR):
                break
        return seen


@pytest.mark.kvm
def test_compiled_and_abi_mode_run_vcpu_agree_exit_by_exit(kvm):
    if not abi.COMPILED:
        pytest.skip("the compiled module is not in use here (VMM_CFFI=abi, or not built)")
    compiled = exit_codes(kvm)
    env = {**os.environ, "VMM_CFFI": "abi"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    other = json.loads(proc.stdout)
    assert other["compiled"] is False, "VMM_CFFI=abi still loaded the compiled module"
    assert other["exits"] == compiled
    assert compiled == EXPECTED


@pytest.mark.kvm
def test_fast_io_fields_decode_a_real_exit(kvm):
    codes = [code for code, _ in exit_codes(kvm)]
    assert abi.fast_io_fields(codes[2]) == (abi.KVM_EXIT_IO_OUT, 1, 0x3F8)
    assert abi.fast_io_fields(codes[4]) == (abi.KVM_EXIT_IO_OUT, 4, 0x84)
    assert abi.fast_io_fields(codes[5]) == (abi.KVM_EXIT_IO_IN, 1, 0x61)


def _strip_c_comments(source: str) -> str:
    return re.sub(r"/\*.*?\*/", "", source, flags=re.DOTALL)


def test_the_c_functions_hard_code_no_abi_number():
    # KVM_RUN, KVM_EXIT_IO, the PIO data offset and the result's layout come from the Python
    # tables through vmm_fast_path_init(); what is left is 0 (no argument, "< 0") and 1
    # (a single access).
    literals = set(re.findall(r"\b(?:0[xX][0-9a-fA-F]+|\d+)(?:[uU]?[lL]{0,2})\b", _strip_c_comments(_cdefs.FAST_PATH)))
    assert literals <= {"0", "0UL", "1"}, literals


def test_a_current_build_is_accepted():
    from kvm_abi import _ffi

    if not abi.COMPILED:
        pytest.skip("the compiled module is not in use here (VMM_CFFI=abi, or not built)")
    assert _ffi.built_digest(_ffi._compiled) == _cdefs.digest()


def _import_in(directory: Path) -> subprocess.CompletedProcess[str]:
    """Import kvm_abi from ``directory`` in a fresh interpreter (its first sys.path entry)."""
    code = "import json, kvm_abi; print(json.dumps([kvm_abi.COMPILED, kvm_abi.__file__]))"
    env = {k: v for k, v in os.environ.items() if k != "VMM_CFFI"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=directory, env=env, capture_output=True, text=True, timeout=60, check=True
    )


def test_a_build_older_than_its_c_source_is_refused(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler to build the module with")
    pkg = tmp_path / "kvm_abi"
    shutil.copytree(ROOT / "kvm_abi", pkg, ignore=shutil.ignore_patterns("*.so", "*.c", "*.o", "__pycache__"))
    subprocess.run([sys.executable, str(pkg / "_build.py")], cwd=tmp_path, capture_output=True, check=True, timeout=300)
    fresh = _import_in(tmp_path)
    compiled, where = json.loads(fresh.stdout)
    assert Path(where).parent == pkg, "the copy under test was not the one imported"
    assert compiled is True and "stale" not in fresh.stderr

    # Edit vmm_run_vcpu's body only (not a declaration) and do not rebuild.
    cdefs = pkg / "_cdefs.py"
    text = cdefs.read_text()
    assert text.count("run->io.count == 1") == 1
    cdefs.write_text(text.replace("run->io.count == 1", "run->io.count >= 1"))
    stale = _import_in(tmp_path)
    assert json.loads(stale.stdout)[0] is False
    assert "compiled module is stale" in stale.stderr


def main() -> int:
    from vmm.kvm import Kvm

    with Kvm() as kvm:
        print(json.dumps({"compiled": abi.COMPILED, "exits": exit_codes(kvm)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
