"""The VMM's error hierarchy. The CLI maps each class to an exit status (DESIGN.md)."""

from __future__ import annotations


class VmmError(Exception):
    """Base class. ``status`` is the exit status ``vmm`` uses for it."""

    status = 2


class InputError(VmmError):
    """Bad input: a malformed image, an impossible size, a bad option."""


class ConfigError(VmmError):
    """A configuration the VMM or the host cannot provide."""


class Unavailable(VmmError):
    """KVM, or a capability of it, is missing. ``capability`` names it when it is one."""

    def __init__(self, message: str, capability: str | None = None) -> None:
        super().__init__(message)
        self.capability = capability


class GuestMemoryError(VmmError):
    """A guest-physical access outside guest RAM (host side, bounds-checked)."""

    def __init__(self, message: str, gpa: int = 0, size: int = 0) -> None:
        super().__init__(message)
        self.gpa = gpa
        self.size = size


class BusError(VmmError):
    """A device registration that overlaps another or makes no sense."""


class UnhandledAccess(VmmError):
    """``--strict``: the guest touched a port or MMIO address no device claims."""

    status = 4
