"""apt and the small helpers every part of the lab build shares.

:class:`Apt` runs ``apt-get`` and ``apt-cache`` either on the system's own configuration
or, for a suite the system does not list (the newer kernels are in ``trixie-backports``),
on a private one under ``.cache/lab/apt/<suite>/``: its own sources list naming that suite
of the same archive the system already uses, its own package lists and its own download
cache. The system's sources, lists and caches are never changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
REPO = LAB_DIR.parent
CACHE = REPO / ".cache" / "lab"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

APT_TIMEOUT = 1800
QUERY_TIMEOUT = 120
UNPACK_TIMEOUT = 600


class LabError(Exception):
    """An expected failure, reported to the user as one ``lab: ...`` line."""


def log(message: str) -> None:
    """Print a progress or error line on stderr."""
    print(f"lab: {message}", file=sys.stderr, flush=True)


def last_line(text: str) -> str:
    """The most telling line of a tool's output: its first ``E:`` line, else its last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or [""])[0 if errors else -1]


def run(
    cmd: Sequence[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise :class:`LabError` ("<what>: <reason>") on failure."""
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise LabError(f"{what}: {cmd[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what}: timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        reason = last_line(proc.stderr) or last_line(proc.stdout)
        raise LabError(f"{what}: {reason or f'exit status {proc.returncode}'}")
    return proc


class Apt:
    """apt-get and apt-cache, refreshing the package lists at most once per process.

    ``options`` (``-o Name=value`` pairs) select a private configuration, see
    :func:`suite_apt`; ``name`` says which lists a message is about."""

    def __init__(self, options: Sequence[str] = (), name: str = "apt") -> None:
        """Start with the package lists as they are."""
        self.options = list(options)
        self.name = name
        self.updated = False
        self.env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def update(self) -> None:
        """Run ``apt-get update`` (once)."""
        if not self.updated:
            log(f"refreshing the {self.name} package lists")
            run(
                ["apt-get", *self.options, "update"],
                what=f"apt-get update ({self.name}) failed",
                timeout=APT_TIMEOUT,
                env=self.env,
            )
            self.updated = True

    def get(self, args: Sequence[str], *, what: str, cwd: Path | None = None) -> None:
        """Run ``apt-get ARGS``; if it fails, refresh the lists once and try again."""
        cmd = ["apt-get", *self.options, *args]
        try:
            run(cmd, what=what, timeout=APT_TIMEOUT, cwd=cwd, env=self.env)
        except LabError:
            if self.updated:
                raise
            self.update()
            run(cmd, what=what, timeout=APT_TIMEOUT, cwd=cwd, env=self.env)

    def query(self, args: Sequence[str], *, what: str) -> str:
        """Run ``apt-cache ARGS`` and return its output."""
        return run(["apt-cache", *self.options, *args], what=what, timeout=QUERY_TIMEOUT, env=self.env).stdout

    def install(self, packages: Sequence[str]) -> None:
        """Install Debian packages on the host."""
        log(f"installing {' '.join(packages)}")
        self.get(
            ["install", "-y", "--no-install-recommends", *packages],
            what=f"could not install {' '.join(packages)}",
        )

    def download(self, package: str, version: str | None = None) -> Path:
        """``apt-get download`` a package into the cache (once); return the .deb."""
        spec = package if version is None else f"{package}={version}"
        debs = CACHE / "debs"
        dest = debs / (f"{package}_{version}.deb" if version else f"{package}.deb")
        if dest.is_file():
            return dest
        debs.mkdir(parents=True, exist_ok=True)
        log(f"downloading {spec}")
        with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
            self.get(["download", spec], what=f"could not download {spec}", cwd=Path(tmp))
            found = sorted(Path(tmp).glob("*.deb"))
            if len(found) != 1:
                raise LabError(f"could not download {spec}: apt-get left {len(found)} .deb files")
            found[0].chmod(0o644)
            os.replace(found[0], dest)
        return dest


def deb_field(deb: Path, field: str) -> str:
    """One control field of a .deb (``Version``, ``Package``...)."""
    return run(
        ["dpkg-deb", "-f", str(deb), field],
        what=f"cannot read {deb.name}",
        timeout=QUERY_TIMEOUT,
    ).stdout.strip()


def unpack_deb(deb: Path, dest: Path) -> Path:
    """``dpkg-deb -x`` a package into ``dest`` (once, atomically); return ``dest``."""
    if dest.is_dir():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    run(
        ["dpkg-deb", "-x", str(deb), str(partial)],
        what=f"could not unpack {deb.name}",
        timeout=UNPACK_TIMEOUT,
    )
    os.replace(partial, dest)
    return dest


def unpack_debs(debs: Sequence[Path], dest: Path) -> Path:
    """``dpkg-deb -x`` several packages into one tree ``dest`` (once, atomically)."""
    if dest.is_dir():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(partial)], what=f"could not unpack {deb.name}", timeout=UNPACK_TIMEOUT)
    os.replace(partial, dest)
    return dest


def system_archive() -> str:
    """The URI of the Debian archive the system's apt sources use for its own release."""
    codename = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                codename = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    out = run(
        ["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE)", "Created-By: Packages"],
        what="apt-get indextargets failed",
        timeout=QUERY_TIMEOUT,
    ).stdout
    pairs = [line.split() for line in out.splitlines() if len(line.split()) == 2]
    for uri, release in pairs:
        if release == codename:
            return uri
    raise LabError(f"no apt source for this system's release ({codename or 'unknown'}) to find other suites in")


def suite_apt(suite: str) -> Apt:
    """An :class:`Apt` on a private configuration listing only ``suite`` (component main)
    of the system's own Debian archive, kept in ``.cache/lab/apt/<suite>/``. Its lists are
    fetched on first use."""
    if not KEYRING.is_file():
        raise LabError(f"{KEYRING} is missing (package debian-archive-keyring)")
    root = CACHE / "apt" / suite
    lists = root / "lists"
    cache = root / "cache"
    for path in (lists / "partial", cache / "archives" / "partial"):
        path.mkdir(parents=True, exist_ok=True)
    sources = root / "sources.list"
    if not sources.is_file():
        line = f"deb [signed-by={KEYRING}] {system_archive()} {suite} main\n"
        tmp = root / "sources.list.tmp"
        tmp.write_text(line)
        os.replace(tmp, sources)
    options = [
        f"-oDir::Etc::sourcelist={sources}",
        "-oDir::Etc::sourceparts=-",
        f"-oDir::State::Lists={lists}",
        f"-oDir::Cache={cache}",
    ]
    apt = Apt(options, name=suite)
    if not any(lists.glob("*_Packages*")):
        apt.update()
    return apt
