"""Turns: the vCPUs of one emulated machine execute one at a time (see
:mod:`vmm.backends.emulator` for why)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Protocol

from vmm.backends.base import StopFlag

# How long a vCPU waits for its turn before it asks the running one to yield.
QUANTUM_SECONDS = 0.005


class Member(Protocol):
    """What a vCPU taking turns offers: a way to ask it to yield."""

    def preempt(self) -> None: ...


class Turns:
    """Round-robin turns among the vCPUs of one machine: at most one executes guest code
    at a time. A vCPU that has waited a quantum asks the running one to yield (it does so
    at its next translation block, a precise point, through its block gate), and a vCPU
    giving up its turn goes to the back of the queue."""

    __slots__ = ("_cond", "_owner", "_queue", "members")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: Member | None = None
        self._queue: deque[Member] = deque()
        self.members = 0  # vCPUs that may ask for a turn: with one, nobody ever waits

    def acquire(self, who: Member, *flags: StopFlag) -> bool:
        """Wait for ``who``'s turn. False, without the turn, as soon as one of ``flags``
        is raised (checked again on every :meth:`wake`)."""
        with self._cond:
            if self._owner is None and not self._queue:
                self._owner = who
                return True
            self._queue.append(who)
            while self._owner is not who:
                if any(f.requested for f in flags):
                    self._queue.remove(who)
                    return False
                if not self._cond.wait(QUANTUM_SECONDS) and self._owner is not None:
                    self._owner.preempt()
            return True

    def release(self, who: Member) -> None:
        """Hand the turn to the longest waiter."""
        with self._cond:
            if self._owner is who:
                self._owner = self._queue.popleft() if self._queue else None
                self._cond.notify_all()

    def wake(self) -> None:
        """Make waiters re-check their flags."""
        with self._cond:
            self._cond.notify_all()
