"""``--log-level``: the ``vmm`` logger's messages on stderr, for every subcommand.

Only the ``vmm`` logger is configured (never the root logger, which belongs to whoever
embeds the package). Default ``warning``: nothing but real trouble. ``info`` adds what the
VMM decided (the backend, how the run ended and its exits); ``debug`` adds the details (the
guest memory layout, where the image went, unclaimed port and MMIO accesses). ``-v`` means
``debug`` unless ``--log-level`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging

from vmm.cli import streams

LOG_LEVELS = ("error", "warning", "info", "debug")


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level LEVEL`` to a subcommand's parser."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="messages of the vmm logger on stderr: error, warning (default), info, debug",
    )


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes ``vmm: <logger>: <message>`` to stderr, which may be closed (never raises)."""

    def __init__(self) -> None:
        super().__init__(streams.StderrProxy())  # type: ignore[arg-type]
        self.setFormatter(logging.Formatter("vmm: %(name)s: %(message)s"))


def setup_logging(ns: argparse.Namespace) -> None:
    """Set the ``vmm`` logger's level from ``--log-level`` (or ``-v``); one handler, however
    often it is called (``vmm qemu`` dispatches the ``vmm run`` it translated to)."""
    name = getattr(ns, "log_level", None) or ("debug" if getattr(ns, "verbose", False) else "warning")
    logger = logging.getLogger("vmm")
    logger.setLevel(getattr(logging, name.upper()))
    if not any(isinstance(h, _Handler) for h in logger.handlers):
        logger.addHandler(_Handler())
    logger.propagate = False  # the root logger is the embedding program's, not ours
