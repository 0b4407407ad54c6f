"""Console input: the 16550's receive side (FIFO, LSR.DR, the received-data interrupt and
its priority in IIR), the bounded host queue, QEMU's Ctrl-A escape, and `vmm run` fed from
a pipe (both backends) and from a terminal (a pty: raw mode while the guest runs, restored
however the run ends; Ctrl-A x quits). The guest is guests/uartecho64.elf: it polls LSR.DR,
echoes what it reads and exits with the count at Ctrl-D."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import termios
import threading

import pytest
from vmm_cli import ROOT, vmm

from vmm.console_input import ConsoleInput, EscapeFilter, InputQueue
from vmm.devices import Serial16550
from vmm.devices.serial import RX_FIFO

RBR, IER, IIR, LSR = 0, 1, 2, 5


class Uart:
    def __init__(self, queue: InputQueue) -> None:
        self.levels: list[int] = []
        self.dev = Serial16550(lambda b: None, irq=self.levels.append, source=queue)

    def read(self, offset: int) -> int:
        out = memoryview(bytearray(1))
        self.dev.read(offset, out)
        return out[0]

    def write(self, offset: int, value: int) -> None:
        self.dev.write(offset, memoryview(bytes([value])))


def test_received_bytes_wait_in_a_16_byte_fifo_behind_lsr_dr():
    queue = InputQueue()
    uart = Uart(queue)
    assert uart.read(LSR) & 1 == 0 and uart.read(RBR) == 0
    queue.put(bytes(range(1, 41)))
    uart.dev.pull()
    assert len(uart.dev.rx) == RX_FIFO and len(queue) == 40 - RX_FIFO  # the rest waits on the host side
    got = []
    while uart.read(LSR) & 1:
        got.append(uart.read(RBR))  # each read refills the FIFO from the queue
    assert got == list(range(1, 41)) and len(queue) == 0


def test_received_data_interrupt_outranks_transmit_empty_in_iir():
    queue = InputQueue()
    uart = Uart(queue)
    uart.write(IER, 0x03)  # received data + THR empty
    assert uart.levels == [1] and uart.read(IIR) == 0x02 and uart.levels == [1, 0]
    queue.put(b"ab")
    uart.dev.pull()
    assert uart.levels == [1, 0, 1] and uart.read(IIR) == 0x04
    uart.write(RBR, ord("z"))  # THR empty pending too: data still first
    assert uart.read(IIR) == 0x04
    assert uart.read(RBR) == ord("a") and uart.read(RBR) == ord("b")
    assert uart.read(IIR) == 0x02  # only then the transmitter
    assert uart.read(IIR) == 0x01 and uart.levels[-1] == 0
    uart.write(IIR, 0x03)  # FCR: FIFO on, receive FIFO reset
    assert uart.read(IIR) == 0xC1


def test_the_host_queue_is_bounded_and_a_full_one_blocks_its_writer():
    queue = InputQueue(limit=8)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (queue.put(b"x" * 20), done.set()), daemon=True)
    writer.start()
    assert not done.wait(0.2) and len(queue) == 8
    received = b""
    while not done.is_set() or len(queue):
        received += queue.take(3)
        done.wait(0.01)
    writer.join(5)
    assert received == b"x" * 20
    queue.close()
    assert queue.put(b"more") is False


def test_ctrl_a_escape_as_qemu():
    quits: list[int] = []
    esc = EscapeFilter(lambda: quits.append(1))
    assert esc.feed(b"a\x01") == b"a" and esc.feed(b"\x01b\x01c") == b"\x01b\x01c"
    assert esc.feed(b"d\x01x" + b"ignored") == b"d" and esc.quit and quits == [1]


def test_input_reaches_the_queue_as_it_arrives_and_eof_just_stops():
    r, w = os.pipe()
    queue = InputQueue()
    arrived = threading.Event()
    reader = ConsoleInput(r, queue, arrived.set)
    reader.start()
    os.write(w, b"first")
    assert arrived.wait(10) and queue.take(100) == b"first"
    os.close(w)
    reader._thread.join(10)
    assert not reader._thread.is_alive()  # end of file ended the reader by itself
    reader.stop()
    os.close(r)


def test_a_guest_reads_what_a_pipe_feeds(vmm_backend):
    proc = vmm("run", "guests/uartecho64.elf", "--backend", vmm_backend, input="hello\nworld\n\x04")
    assert proc.stdout == "echo: ready\nhello\nworld\n", proc.stderr
    assert proc.returncode == (12 << 1) | 1, proc.stderr


def test_after_eof_the_guest_runs_on_until_its_end(vmm_backend):
    proc = vmm("run", "guests/uartecho64.elf", "--backend", vmm_backend, "--timeout", "1", input="ab")
    assert proc.stdout == "echo: ready\nab" and proc.returncode == 124, proc.stderr


# --- on a terminal ----------------------------------------------------------------------


class Pty:
    """vmm run guests/uartecho64.elf with stdin and stdout on a pty slave."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmm", "run", "guests/uartecho64.elf", "-q"],
            stdin=self.slave, stdout=self.slave, stderr=subprocess.PIPE, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        self.seen = b""

    def read_until(self, text: bytes, timeout: float = 60) -> None:
        while text not in self.seen:
            ready, _, _ = select.select([self.master], [], [], timeout)
            assert ready, f"no {text!r} on the terminal; saw {self.seen!r}"
            self.seen += os.read(self.master, 1024)

    def finish(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err.decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty():
    term = Pty()
    yield term
    term.close()


def test_on_a_terminal_ctrl_a_x_quits_and_the_terminal_is_restored(pty):
    pty.read_until(b"echo: ready")
    raw = termios.tcgetattr(pty.slave)
    assert raw[3] & termios.ICANON == 0 and raw[3] & termios.ECHO == 0  # raw while the guest runs
    os.write(pty.master, b"ab\x03\x01\x01")  # Ctrl-C goes to the guest; Ctrl-A Ctrl-A sends one Ctrl-A
    pty.read_until(b"ab\x03\x01")
    os.write(pty.master, b"\x01x")
    status, err = pty.finish()
    assert (
        status == 130 and [line for line in err.splitlines() if "running on the in-process emulator" not in line] == []
    )
    assert termios.tcgetattr(pty.slave) == pty.before


def test_on_a_terminal_a_normal_end_restores_it(pty):
    pty.read_until(b"echo: ready")
    os.write(pty.master, b"abc\x04")
    status, _ = pty.finish()
    assert status == (3 << 1) | 1 and termios.tcgetattr(pty.slave) == pty.before


def test_on_a_terminal_sigterm_ends_the_run_and_restores_it(pty):
    pty.read_until(b"echo: ready")
    assert termios.tcgetattr(pty.slave) != pty.before
    pty.proc.send_signal(signal.SIGTERM)
    status, err = pty.finish()
    assert status == 130 and "Traceback" not in err, err
    assert termios.tcgetattr(pty.slave) == pty.before
