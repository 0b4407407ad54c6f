"""``vmm caps``: what this host's KVM offers, by capability name."""

from __future__ import annotations

import argparse
from typing import Any

from vmm.cli import streams
from vmm.cli.logs import add_log_level


def add_parser(sub: Any) -> None:
    caps = sub.add_parser("caps", help="what this host's KVM offers", description="Report the host's KVM capabilities.")
    caps.add_argument("--json", action="store_true", help="one JSON object (capability names without KVM_CAP_)")
    add_log_level(caps)
    caps.set_defaults(handler=cmd_caps)


def cmd_caps(ns: argparse.Namespace) -> int:
    import json  # here, not at import: `vmm run` imports this module to build its parser

    from vmm.caps import caps_report, format_caps

    report = caps_report()
    streams.write_text((json.dumps(report) if ns.json else format_caps(report)) + "\n")
    return 0
