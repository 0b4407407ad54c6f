"""The gdb stub end to end: `vmm run --gdb` driven by Debian's real gdb (batch mode) and,
for what batch mode cannot do (Ctrl-C, holding the guest), by a raw protocol client."""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest
from vmm_cli import ROOT, vmm

import kvm_abi as abi
from vmm import exits as ex
from vmm.gdb import protocol as p

HELLO = "guests/hello64.elf"
PUTS = 0x100018  # hello64's `puts` (nm guests/hello64.elf)
MSG = 0x100156  # its "hello from long mode\n"


@pytest.fixture(scope="module")
def guest_debug() -> None:
    """Skip unless this KVM reports a single step as KVM_EXIT_DEBUG (and gdb exists)."""
    if shutil.which("gdb") is None:
        pytest.skip("needs gdb (Debian: apt-get install gdb)")
    from vmm import Kvm

    try:
        with Kvm() as kvm, kvm.create_vm() as vm:
            vm.add_memory(gpa=0, size=1 << 20, backing="anon")
            vm.memory.write(0x1000, b"\x90\x90\xf4")  # nop; nop; hlt (real mode)
            vcpu = vm.create_vcpu(0)
            sregs = vcpu.get_sregs()
            sregs.cs.base, sregs.cs.selector = 0, 0
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = 0x1000, 2
            vcpu.set_regs(regs)
            vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)
            got = vcpu.run()
    except (OSError, abi.KvmError) as e:
        pytest.skip(f"requires a usable /dev/kvm with KVM_SET_GUEST_DEBUG: {e}")
    if not isinstance(got, ex.Debug):
        pytest.skip(f"KVM_SET_GUEST_DEBUG single-step gives no KVM_EXIT_DEBUG on this KVM (got {got!r})")


class Vmm:
    """`vmm run ARGS --gdb tcp::0` (or ``argv`` as given): started, its stub's port read
    from its first stderr line."""

    def __init__(self, *args: str, argv: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmm", *(argv or ("run", *args, "--gdb", "tcp::0"))],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        first = self.proc.stderr.readline()
        m = re.search(r"gdb stub listening on 127\.0\.0\.1:(\d+)", first)
        if m is None:
            self.proc.kill()
            self.proc.communicate()
            pytest.fail(f"vmm did not start its stub: {first!r}")
        self.port = int(m.group(1))

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"vmm did not end: {err}")
        return self.proc.returncode, out, err


def gdb(port: int, *commands: str) -> str:
    """Debian's gdb in batch mode against the stub; its stdout and stderr together."""
    args = ["gdb", "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    return done.stdout + done.stderr


class Client:
    """A minimal remote-protocol client (ack mode), for Ctrl-C and timing-free holds."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = p.PacketReader()
        self.pending: list[bytes] = []

    def send(self, payload: bytes) -> None:
        self.sock.sendall(p.frame(payload))

    def reply(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            self.pending += [e.payload for e in self.reader.feed(data) if isinstance(e, p.Packet)]
        return self.pending.pop(0)

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.kvm
def test_break_continue_registers_memory_step_and_write(guest_debug):
    vm = Vmm(HELLO, "-S")
    out = gdb(
        vm.port,
        "info registers rip",
        f"break *{PUTS:#x}",
        "continue",
        "info registers rip rdi rsi",
        f"x/4bx {PUTS:#x}",
        "stepi",
        "info registers rip",
        "set $rax = 0x1234",
        "p/x $rax",
        f"set {{char}}{MSG:#x} = 'H'",
        "delete",
        "continue",
    )
    status, console, err = vm.finish()
    assert "rip            0x100000" in out, out  # -S: held at the entry point
    assert f"Breakpoint 1, 0x0000000000{PUTS:x} in ?? ()" in out, out
    assert f"rip            {PUTS:#x}" in out and f"rdi            {MSG:#x}" in out, out
    assert re.search(rf"{PUTS:#x}:\s+0x56\s+0x48\s+0x89\s+0xf1", out), out  # push %rsi; mov %rsi,%rcx
    assert f"0x0000000000{PUTS + 1:x} in ?? ()" in out, out  # one instruction (push is 1 byte)
    assert "$1 = 0x1234" in out, out
    assert "exited with code 01" in out, out
    assert status == 1, err
    assert console == "Hello from long mode\n"  # the byte gdb wrote, through KVM_TRANSLATE


@pytest.mark.kvm
def test_symbols_backtrace_and_finish_with_the_image_loaded(guest_debug):
    vm = Vmm(HELLO, "-S")
    args = ["gdb", "-batch", "-nx", str(ROOT / HELLO), "-ex", f"target remote 127.0.0.1:{vm.port}"]
    for c in ("break puts", "continue", "bt", "x/s $rdi", "info registers cr0 efer", "finish", "continue"):
        args += ["-ex", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False).stdout
    status, console, err = vm.finish()
    assert "0x0000000000100000 in _start ()" in out, out
    assert "Breakpoint 1, 0x0000000000100018 in puts ()" in out, out
    assert "#1  0x0000000000100011 in _start ()" in out, out  # the return address on the guest's stack
    assert f'{MSG:#x}:\t"hello from long mode\\n' in out, out
    assert re.search(r"cr0\s+0x8\w+", out) and re.search(r"efer\s+0x500\b", out), out  # PG; LME|LMA
    assert re.search(r"^0x0000000000100011 in _start \(\)$", out, re.M), out  # `finish` came back
    assert "exited with code 01" in out, out
    assert (status, console) == (1, "hello from long mode\n"), err


@pytest.mark.kvm
def test_a_crash_stops_in_gdb_before_the_run_ends(guest_debug):
    vm = Vmm("guests/ud64.elf", "-S")  # ud2 with no IDT: a triple fault
    out = gdb(vm.port, "continue", "info registers rip", "x/2bx $rip", "continue")
    status, console, err = vm.finish()
    assert "Program received signal SIGSEGV" in out, out
    assert re.search(r"0x100011:\s+0x0f\s+0x0b", out), out  # gdb looks at the ud2 that crashed
    assert "exited with code 04" in out, out  # continuing ends the run as the crash
    assert status == 4 and "triple fault" in err and console == "invalid opcode next\n", err


@pytest.mark.kvm
def test_bad_addresses_are_errors_and_the_guest_goes_on(guest_debug):
    vm = Vmm(HELLO, "-S", "--mem", "16M")
    out = gdb(vm.port, "x/4bx 0x7f0000000000", "x/4bx 0x3ff0000", "set {char}0x3ff0000 = 1", "p 1", "continue")
    status, console, err = vm.finish()
    assert "Cannot access memory at address 0x7f0000000000" in out, out  # no translation
    assert "Cannot access memory at address 0x3ff0000" in out, out  # mapped, but beyond guest RAM
    assert "$1 = 1" in out and "exited with code 01" in out, out
    assert (status, console) == (1, "hello from long mode\n"), err


@pytest.mark.kvm
def test_kill_ends_the_run(guest_debug):
    vm = Vmm(HELLO, "-S")
    out = gdb(vm.port, "kill")
    status, console, err = vm.finish()
    assert "[Inferior 1 (Remote target) killed]" in out, out
    assert status == 0 and "killed from gdb" in err, err
    assert console == ""  # held by -S, then killed: not one instruction ran


@pytest.mark.kvm
def test_detach_lets_the_guest_run_to_its_end(guest_debug):
    vm = Vmm(HELLO, "-S")
    out = gdb(vm.port, f"break *{PUTS:#x}", "continue", "detach")
    status, console, err = vm.finish()
    assert "Breakpoint 1, " in out and "[Inferior 1 (Remote target) detached]" in out, out
    # On from the breakpoint, which went with gdb (puts runs once per call: no second stop).
    assert (status, console) == (1, "hello from long mode\n"), err


@pytest.mark.kvm
def test_a_second_gdb_connects_after_a_detach(guest_debug):
    vm = Vmm("guests/spin64.elf", "--timeout", "0")  # spins forever: only gdb ends it
    first = gdb(vm.port, "info registers rip", "detach")
    second = gdb(vm.port, "info registers rip", "kill")
    status, _, err = vm.finish()
    assert "rip            0x100000" in first and "detached" in first, first
    assert "rip            0x100000" in second and "killed" in second, second
    assert status == 0 and "killed from gdb" in err, err


@pytest.mark.kvm
def test_threads_are_the_vcpus(guest_debug):
    vm = Vmm("guests/smp64.elf", "--vcpus", "2", "-S")
    out = gdb(vm.port, "info threads", "thread 2", "info registers rip", "continue")
    status, console, err = vm.finish()
    assert re.search(r"\* 1\s+Thread 1 \(vCPU 0\)", out) and re.search(r"\b2\s+Thread 2 \(vCPU 1\)", out), out
    assert "[Switching to thread 2 (Thread 2)]" in out, out
    assert "exited with code 01" in out, out
    assert status == 1 and "cpu 0 of 2" in console and "cpu 1 of 2" in console, err


@pytest.mark.kvm
def test_ctrl_c_stops_a_running_guest(guest_debug):
    vm = Vmm("guests/spin64.elf", "--timeout", "0")  # spins forever: only gdb ends it
    client = Client(vm.port)
    try:
        assert client.ask(b"?") == b"T05thread:1;"  # connecting stopped it
        client.send(b"c")
        client.sock.sendall(p.INTERRUPT)
        assert client.reply() == b"T02thread:1;"
        client.sock.sendall(p.frame(b"c") + p.INTERRUPT)  # in one segment: the 0x03 still counts
        assert client.reply() == b"T02thread:1;"
        regs = p.decode_registers(client.ask(b"g").decode())
        assert regs["rip"] == 0x100000  # `1: jmp 1b`
        client.send(b"k")
    finally:
        client.close()
    status, _, err = vm.finish()
    assert status == 0 and "killed from gdb" in err, err


@pytest.mark.kvm
def test_a_connection_reset_lets_the_guest_run_on(guest_debug):
    vm = Vmm(HELLO, "-S")
    client = Client(vm.port)
    try:
        assert client.ask(b"Z0,%x,1" % PUTS) == b"OK"
        assert client.ask(b"c") == b"T05thread:1;"  # at the breakpoint
        # Close with a reset (SO_LINGER 0), not a clean FIN: the stub takes it as a hang-up.
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        client.close()
    status, console, err = vm.finish()
    assert (status, console) == (1, "hello from long mode\n"), err
    assert "Traceback" not in err and "gdb stub failed" not in err, err


@pytest.mark.kvm
def test_the_timeout_does_not_count_while_gdb_holds_the_guest(guest_debug):
    vm = Vmm(HELLO, "-S", "--timeout", "1")
    client = Client(vm.port)
    try:
        assert client.ask(b"qAttached") == b"1"
        time.sleep(1.5)  # the scenario, not synchronisation: held longer than --timeout
        assert client.ask(b"c") == b"W01"  # the guest ran to its exit, not into the timeout
    finally:
        client.close()
    status, console, err = vm.finish()
    assert (status, console) == (1, "hello from long mode\n"), err


@pytest.mark.kvm
def test_malformed_packets_get_errors(guest_debug):
    vm = Vmm(HELLO, "-S")
    client = Client(vm.port)
    try:
        assert client.ask(b"mzz,4") == b"E01"
        assert client.ask(b"p999") == b"E01"
        assert client.ask(b"Hg99") == b"E02"
        assert client.ask(b"Pcs=08000000").startswith(b"E")  # read-only through the stub
        assert client.ask(b"Z0,100000,1") == b"OK"
        for addr in (1, 2, 3):
            assert client.ask(b"Z0,10000%d,1" % addr) == b"OK"
        assert client.ask(b"Z0,100009,1") == b"E1C"  # four debug registers only
        assert client.ask(b"Z2,100000,4") == b""  # watchpoints: gdb single-steps instead
        assert client.ask(b"vMustReplyEmpty") == b""
        client.sock.sendall(b"$g#00")  # a bad checksum: a NACK, and the stub carries on
        assert client.ask(b"qC") == b"QC1"
        client.send(b"D")
        assert client.reply() == b"OK"
    finally:
        client.close()
    status, console, err = vm.finish()
    assert (status, console) == (1, "hello from long mode\n"), err


@pytest.mark.kvm
def test_through_the_qemu_front_door(guest_debug):
    vm = Vmm(argv=("qemu", "-kernel", HELLO, "-gdb", "tcp::0", "-S", "-nographic"))
    out = gdb(vm.port, f"break *{PUTS:#x}", "continue", "info registers rip", "delete", "continue")
    status, console, err = vm.finish()
    assert f"rip            {PUTS:#x}" in out and "exited with code 01" in out, out
    assert (status, console) == (1, "hello from long mode\n"), err


@pytest.mark.kvm
def test_the_stub_from_a_config_file(guest_debug, tmp_path):
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"image": str(ROOT / HELLO), "gdb": "tcp::0", "gdb_wait": True}))
    vm = Vmm(argv=("run", "--config", str(config)))
    out = gdb(vm.port, "info registers rip", "continue")
    status, console, err = vm.finish()
    assert "rip            0x100000" in out and "exited with code 01" in out, out  # held, as with -S
    assert (status, console) == (1, "hello from long mode\n"), err


def test_gdb_on_the_emulator_is_one_line_status_2():
    done = vmm("run", HELLO, "--backend", "emulator", "-s")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "vmm: --gdb needs the KVM backend (KVM_SET_GUEST_DEBUG); the emulator backend has none"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-S"], "vmm: -S (wait for gdb) needs a gdb stub: add -s or --gdb tcp::PORT"),
        (["--gdb", "udp::1"], "vmm: bad gdb address 'udp::1': use tcp::PORT or tcp:HOST:PORT (PORT 0-65535)"),
    ],
)
def test_bad_gdb_options_are_one_line_status_2(args, message):
    done = vmm("run", HELLO, *args)
    assert (done.returncode, done.stderr.strip()) == (2, message)


@pytest.mark.kvm
def test_a_port_in_use_is_one_line_status_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = vmm("run", HELLO, "--gdb", f"tcp::{port}")
    assert done.returncode == 2
    assert done.stderr.strip() == f"vmm: --gdb 127.0.0.1:{port}: cannot listen: Address already in use"
