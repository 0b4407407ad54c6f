"""The gdb remote stub: a TCP listener, one client at a time, the commands gdb sends.

One thread serves the socket. While the guest runs it waits in ``select`` for gdb's
Ctrl-C (0x03) or a stop (a vCPU writes to the wake pipe); while the guest is stopped it
answers packets, touching vCPUs only through the parked-vCPU guarantee of
:class:`~vmm.gdb.session.DebugSession`. Guest-virtual addresses are translated with
KVM_TRANSLATE page by page, and every guest-physical range goes through
:class:`~vmm.memory.GuestMemory`'s bounds checks (:mod:`vmm.gdb.target`); a bad address is
an ``E`` reply.

Threads: gdb thread ``n`` is vCPU ``n - 1``. ``Hg`` picks the vCPU whose registers and
address space the commands use; ``s`` steps the vCPU that stopped last (or ``Hc``'s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Sequence

from kvm_abi import KvmError
from vmm.errors import ConfigError
from vmm.gdb import protocol as p
from vmm.gdb.session import DebugSession, Runner, wake_pipe
from vmm.gdb.target import read_registers, read_virtual, write_registers, write_virtual
from vmm.memory import GuestMemory
from vmm.vcpu import Vcpu

log = logging.getLogger("vmm.gdb")

FINISH_WAIT_SECONDS = 5.0  # the machine joins its vCPU threads (2 s grace) before it knows the status
MAX_MEMORY_READ = (p.MAX_PACKET - 8) // 2
E_BAD_PACKET, E_NO_THREAD, E_FAULT, E_NO_SLOT = b"E01", b"E02", b"E14", b"E1C"


class GdbStub:
    """Listens on ``address`` (host, port; port 0 = a free one, see :attr:`port`) before
    the guest starts; :meth:`start` serves gdb on a thread; :meth:`finish` tells gdb how
    the run ended; :meth:`close` closes every socket and fd. ``debug_flags``: the
    KVM_GUESTDBG_* bits KVM accepts (KVM_CAP_SET_GUEST_DEBUG2), 0 if it does not say."""

    def __init__(
        self,
        address: tuple[str, int],
        runners: Sequence[Runner],
        memory: GuestMemory,
        *,
        wait: bool,
        kill: Callable[[], None],
        debug_flags: int = 0,
    ) -> None:
        host, port = address
        self._memory = memory
        self._kill = kill
        self._client: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._no_ack = False
        self._gthread = 0  # vCPU index for registers and memory (Hg)
        self._exit_status: int | None = None
        self._finished = threading.Event()  # set once the run's status is known
        self._closed = False
        self._send_lock = threading.Lock()
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._listener = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            raise ConfigError(f"--gdb {host}:{port}: cannot create a socket: {e.strerror}") from None
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(1)
        except (OSError, OverflowError) as e:
            self._listener.close()
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"--gdb {host}:{port}: cannot listen: {why}") from None
        self.host, self.port = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = wake_pipe()
        self.session = DebugSession(runners, start_paused=wait, wake=self._wake, debug_flags=debug_flags)

    # --- lifetime ----------------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full pipe: a wake-up is pending anyway
            os.write(self._wake_w, b"!")

    def start(self) -> None:
        """Serve gdb on a daemon thread until :meth:`finish`."""
        self._thread = threading.Thread(target=self._serve, name="gdb-stub", daemon=True)
        self._thread.start()

    def finish(self, status: int | None = None) -> None:
        """The run ended (``status`` = vmm's exit status): release parked vCPUs, tell a
        gdb waiting for the guest (``W`` reply), stop serving."""
        self._exit_status = status
        self._finished.set()
        self.session.end()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def close(self) -> None:
        """Close the listener, the client and the wake pipe (idempotent)."""
        if self._closed:
            return
        self.finish(self._exit_status)
        self._closed = True
        for sock in (self._client, self._listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._client = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- the serving thread ------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self.session.ending:
                if not self._wait_readable(self._listener):
                    return
                try:
                    client, _ = self._listener.accept()
                except OSError as e:  # the connection went away before we took it
                    log.debug("gdb: accept: %s", e)
                    continue
                self._client = client
                try:
                    self._session(client)
                except OSError as e:  # reset, broken pipe: as a hang-up
                    log.debug("gdb: connection lost: %s", e)
                    self._hang_up()
                finally:
                    self.session.attached = False
                    self._client = None
                    with contextlib.suppress(OSError):
                        client.close()
        except Exception:  # a bug in the stub must not take the machine down with it
            log.exception("gdb stub failed")
            with contextlib.suppress(Exception):
                self._hang_up()

    def _hang_up(self) -> None:
        """gdb is gone: stop the guest if it runs, drop the breakpoints, let it run on."""
        self.session.interrupt(p.SIGINT)
        if self.session.wait_all_parked():
            self.session.resume_detached()

    def _wait_readable(self, sock: socket.socket) -> bool:
        """Wait until ``sock`` is readable (True) or the machine ends (False)."""
        while True:
            ready, _, _ = select.select([sock.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                self._drain_wake()
                if self.session.ending:
                    return False
            if sock.fileno() in ready:
                return True

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 512):
                pass

    def _session(self, client: socket.socket) -> None:
        """One gdb connection: the guest stops; packets until detach, kill or hang-up."""
        self._no_ack = False
        self._gthread = 0
        reader = p.PacketReader()
        self.session.interrupt(p.SIGTRAP)
        if not self.session.wait_all_parked():
            return
        self.session.attached = True
        while True:
            if not self._wait_readable(client):
                return
            data = client.recv(65536)
            if not data:
                self._hang_up()
                return
            events = reader.feed(data)
            while events:
                event = events.pop(0)
                if isinstance(event, p.BadPacket):
                    log.debug("gdb: %s", event.reason)
                    client.sendall(p.NACK)
                    continue
                if isinstance(event, p.Interrupt):
                    continue  # already stopped
                if not self._no_ack:
                    client.sendall(p.ACK)
                outcome = self._command(event.payload)
                if outcome == "detach" or outcome == "kill":
                    return
                if outcome == "resume" and not self._run_until_stop(client, reader, events):
                    return

    def _send(self, payload: bytes) -> None:
        client = self._client
        if client is not None:
            with self._send_lock:
                client.sendall(p.frame(payload))

    def _run_until_stop(self, client: socket.socket, reader: p.PacketReader, queued: list[p.Event]) -> bool:
        """The guest runs: wait for a stop (reply with it), a Ctrl-C (stop the guest), or
        the machine's end (``W`` reply; False). ``queued``: events that came in the same
        read as the ``c``/``s`` (a Ctrl-C among them counts)."""
        if any(isinstance(e, p.Interrupt) for e in queued):
            queued[:] = [e for e in queued if not isinstance(e, p.Interrupt)]
            self.session.interrupt(p.SIGINT)
        while True:
            ready, _, _ = select.select([client.fileno(), self._wake_r], [], [])
            if client.fileno() in ready:
                data = client.recv(65536)
                if not data:  # gdb went away with the guest running
                    self._hang_up()
                    return False
                if any(isinstance(e, p.Interrupt) for e in reader.feed(data)):
                    self.session.interrupt(p.SIGINT)
            if self._wake_r in ready:
                self._drain_wake()
            if self.session.ending:
                # The vCPUs are stopping; the machine knows the status once they have.
                self._finished.wait(FINISH_WAIT_SECONDS)
                if self._exit_status is not None:
                    self._send(b"W%02x" % (self._exit_status & 0xFF))
                return False
            if self.session.stop_event is not None and self.session.paused:
                if not self.session.wait_all_parked():
                    continue  # ending: reported at the top of the loop
                index, signal = self.session.stop_event
                self._gthread = index
                self._send(p.stop_reply(signal, index + 1))
                return True

    # --- commands ----------------------------------------------------------------------
    def _command(self, packet: bytes) -> str:
        """Answer one packet; returns "resume", "detach", "kill" or "" (stay stopped)."""
        kind, body = packet[:1], packet[1:]
        try:
            if kind in (b"c", b"s", b"C", b"S"):
                if kind in (b"C", b"S"):  # with a signal: a guest has no signals to take
                    p.hex_int(body.partition(b";")[0])  # (as QEMU's system stub ignores it)
                    body = body.partition(b";")[2]
                if body:
                    self._set_rip(p.hex_int(body))
                step = self._gthread if kind in (b"s", b"S") else None
                self.session.resume(step)
                return "resume"
            if kind == b"D":
                self._send(b"OK")
                self.session.resume_detached()
                return "detach"
            if kind == b"k":
                self._kill()  # the vCPUs leave park only to see the machine's stop flag
                return "kill"
            self._send(self._answer(kind, body))
        except _Answered:
            pass
        except (ValueError, UnicodeDecodeError):
            self._send(E_BAD_PACKET)
        except KvmError as e:
            log.debug("gdb: %s", e)
            self._send(E_FAULT)
        return ""

    def _answer(self, kind: bytes, body: bytes) -> bytes:
        if kind == b"?":
            index, signal = self.session.stop_event or (self._gthread, p.SIGTRAP)
            return p.stop_reply(signal, index + 1)
        if kind == b"g":
            return p.encode_registers(read_registers(self._vcpu())).encode()
        if kind == b"G":
            write_registers(self._vcpu(), p.decode_registers(body.decode("ascii")))
            return b"OK"
        if kind == b"p":
            n = p.hex_int(body)
            if n >= len(p.REGISTERS):
                return E_BAD_PACKET
            reg = p.REGISTERS[n]
            return _one(read_registers(self._vcpu()).get(reg.name), reg.size)
        if kind == b"P":
            num, _, value = body.partition(b"=")
            n = p.hex_int(num)
            if n >= len(p.REGISTERS):
                return E_BAD_PACKET
            reg = p.REGISTERS[n]
            write_registers(self._vcpu(), {reg.name: p.parse_le_hex(value.decode("ascii"), reg.size)}, strict=True)
            return b"OK"
        if kind == b"m":
            addr, length = p.parse_addr_len(body)
            data = read_virtual(self._vcpu(), self._memory, addr, min(length, MAX_MEMORY_READ))
            return data.hex().encode() if data else E_FAULT
        if kind == b"M":
            head, _, hexdata = body.partition(b":")
            addr, length = p.parse_addr_len(head)
            data = bytes.fromhex(hexdata.decode("ascii"))
            return self._write(addr, data) if len(data) == length else E_BAD_PACKET
        if kind == b"X":
            head, _, raw = body.partition(b":")
            addr, length = p.parse_addr_len(head)
            data = p.unescape(raw)
            return self._write(addr, data) if len(data) == length else E_BAD_PACKET
        if kind in (b"Z", b"z"):
            return self._breakpoint(kind == b"Z", body)
        if kind == b"H":
            return self._select_thread(body)
        if kind == b"T":
            return b"OK" if self._thread_index(body) is not None else E_NO_THREAD
        if kind == b"q" or kind == b"Q":
            return self._query(kind + body)
        return b""  # not supported: gdb falls back or says so

    def _query(self, q: bytes) -> bytes:
        if q.startswith(b"qSupported"):
            return b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+" % p.MAX_PACKET
        if q == b"QStartNoAckMode":
            self._send(b"OK")
            self._no_ack = True
            raise _Answered
        if q.startswith(b"qXfer:features:read:"):
            annex, _, span = q[len(b"qXfer:features:read:") :].partition(b":")
            if annex != b"target.xml":
                return b"E00"
            offset, length = p.parse_addr_len(span)
            return p.xfer_chunk(p.target_xml().encode(), offset, length)
        if q == b"qAttached":
            return b"1"
        if q == b"qC":
            return b"QC%x" % (self._gthread + 1)
        if q == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (r.index + 1) for r in self.session.runners)
        if q == b"qsThreadInfo":
            return b"l"
        if q.startswith(b"qThreadExtraInfo,"):
            index = self._thread_index(q.split(b",", 1)[1])
            return b"" if index is None else (f"vCPU {index}").encode().hex().encode()
        if q.startswith(b"qSymbol"):
            return b"OK"
        return b""

    def _vcpu(self) -> Vcpu:
        return self.session.runners[self._gthread].vcpu

    def _thread_index(self, text: bytes) -> int | None:
        tid = int(text, 16) if text not in (b"-1", b"0") else 1
        index = tid - 1
        return index if 0 <= index < len(self.session.runners) else None

    def _select_thread(self, body: bytes) -> bytes:
        op, tid = body[:1], body[1:]
        index = self._thread_index(tid)
        if index is None:
            return E_NO_THREAD
        if op == b"g" or (op == b"c" and tid not in (b"-1", b"0")):
            self._gthread = index
        return b"OK"

    def _set_rip(self, rip: int) -> None:
        write_registers(self._vcpu(), {"rip": rip}, strict=True)

    def _write(self, addr: int, data: bytes) -> bytes:
        return b"OK" if write_virtual(self._vcpu(), self._memory, addr, data) else E_FAULT

    def _breakpoint(self, insert: bool, body: bytes) -> bytes:
        kind, _, rest = body.partition(b",")
        if kind not in (b"0", b"1"):
            return b""  # watchpoints: gdb falls back to single-stepping
        addr_text, _, _ = rest.partition(b",")
        addr = p.hex_int(addr_text)
        if not insert:
            self.session.remove_breakpoint(addr)
            return b"OK"
        return b"OK" if self.session.insert_breakpoint(addr) else E_NO_SLOT


class _Answered(Exception):
    """A command that sent its own reply."""


def _one(value: int | None, size: int) -> bytes:
    return (b"xx" * size) if value is None else p.le_hex(value, size).encode()
