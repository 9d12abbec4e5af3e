"""``burrow trust``: put the dev CA into the stores that tools and browsers read, or take it out.

Two kinds of store, each changed only where this machine has it:

- the system store, which curl, wget, OpenSSL and Python's ``ssl`` read: a file
  in the distribution's anchors directory and its update command
  (``update-ca-certificates`` on Debian and Ubuntu, ``update-ca-trust`` on
  Fedora and RHEL), run through ``sudo`` when we are not root;
- NSS stores, which Chromium (``~/.pki/nssdb``) and Firefox (each profile)
  read, changed with ``certutil`` (Debian ``libnss3-tools``) when it exists.

Each entry is named after the CA's fingerprint, so ``--remove`` takes out
exactly what ``burrow trust`` put in, and two users' CAs never collide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError

#: A store's command should take a second; a minute means something hangs (a sudo prompt nobody answers).
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class SystemStore:
    """A distribution's store: where an extra CA goes and what rebuilds the bundle from it."""

    anchors: Path
    update: tuple[str, ...]
    suffix: str
    bundle: Path  # what the update command writes: what OpenSSL-based tools read

    def bundled(self, ca: CA) -> bool:
        """True when the bundle holds ``ca`` (an update may have failed after its file was placed)."""
        body = b"".join(line for line in ca.pem.splitlines() if not line.startswith(b"-----"))
        try:
            return body in b"".join(self.bundle.read_bytes().splitlines())
        except OSError:
            return False


SYSTEM_STORES = (
    SystemStore(  # Debian, Ubuntu
        Path("/usr/local/share/ca-certificates"),
        ("update-ca-certificates",),
        ".crt",
        Path("/etc/ssl/certs/ca-certificates.crt"),
    ),
    SystemStore(  # Fedora, RHEL
        Path("/etc/pki/ca-trust/source/anchors"),
        ("update-ca-trust", "extract"),
        ".pem",
        Path("/etc/pki/tls/certs/ca-bundle.crt"),
    ),
)

MACOS_HINT = "on macOS: sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain"


@dataclass(frozen=True)
class CA:
    """The certificate to trust, and the short name its entries carry."""

    path: Path
    pem: bytes
    fingerprint: str  # SHA-256, hex

    @property
    def tag(self) -> str:
        return f"burrow-dev-ca-{self.fingerprint[:16]}"

    @property
    def nickname(self) -> str:
        return f"burrow dev CA {self.fingerprint[:16]}"


def trust(ca: CA, *, remove: bool = False) -> list[str]:
    """Add ``ca`` to (or with ``remove``, take it out of) every store found; one line per change made."""
    store = _system_store()
    if store is None:
        raise ConfigurationError(
            "found no system certificate store (update-ca-certificates or update-ca-trust); "
            f"trust {ca.path} by hand ({MACOS_HINT} {ca.path})"
        )
    lines = [_system(store, ca, remove)]
    certutil = shutil.which("certutil")
    if certutil is None:
        lines.append("NSS stores (Chromium, Firefox): certutil not found; install libnss3-tools and run this again")
        return lines
    lines.extend(_nss(certutil, database, ca, remove) for database in _nss_databases(create=not remove))
    return lines


def _system_store() -> SystemStore | None:
    for store in SYSTEM_STORES:
        if store.anchors.is_dir() and shutil.which(store.update[0]):
            return store
    return None


def _system(store: SystemStore, ca: CA, remove: bool) -> str:
    entry = store.anchors / f"{ca.tag}{store.suffix}"
    present = entry.is_file() and entry.read_bytes() == ca.pem
    update = " ".join(store.update)
    if remove:
        if not entry.exists():
            if not store.bundled(ca):
                return f"system store: was not trusted ({entry} absent)"
            _run_as_root(store.update)  # (a removal whose update failed: finish it)
            return f"system store: {entry} was gone, ran {update} to drop it from {store.bundle}"
        _run_as_root(["rm", "-f", str(entry)])
        _run_as_root(store.update)
        return f"system store: removed {entry}, ran {update}"
    if present:
        if store.bundled(ca):
            return f"system store: already trusted ({entry})"
        _run_as_root(store.update)  # (an install whose update failed: finish it)
        return f"system store: {entry} was there, ran {update} to put it in {store.bundle}"
    with tempfile.NamedTemporaryFile(suffix=store.suffix) as staged:  # `install` needs a file sudo can read
        staged.write(ca.pem)
        staged.flush()
        os.chmod(staged.name, 0o644)
        _run_as_root(["install", "-m", "0644", staged.name, str(entry)])
    _run_as_root(store.update)
    return f"system store: added {entry}, ran {update}"


def _nss_databases(create: bool) -> Iterator[Path]:
    """Chromium's database (made when missing and ``create``), then each Firefox profile's."""
    home = Path.home()
    chromium = home / ".pki" / "nssdb"
    if create:
        chromium.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (chromium / "cert9.db").exists() or create:
        yield chromium
    for firefox in (home / ".mozilla" / "firefox", home / "snap" / "firefox" / "common" / ".mozilla" / "firefox"):
        yield from sorted(profile.parent for profile in firefox.glob("*/cert9.db"))


def _nss(certutil: str, database: Path, ca: CA, remove: bool) -> str:
    where = f"sql:{database}"
    if not (database / "cert9.db").exists():
        _run([certutil, "-N", "-d", where, "--empty-password"])
    present = _run([certutil, "-L", "-d", where, "-n", ca.nickname], check=False) == 0
    if remove:
        if not present:
            return f"NSS store {database}: was not trusted"
        while _run([certutil, "-D", "-d", where, "-n", ca.nickname], check=False) == 0:
            pass  # certutil deletes one entry of a nickname per call
        if _run([certutil, "-L", "-d", where, "-n", ca.nickname], check=False) == 0:
            raise ConfigurationError(
                f"certutil could not remove {ca.nickname!r} from {database} (in use or read-only?)"
            )
        return f"NSS store {database}: removed {ca.nickname!r}"
    if present:
        return f"NSS store {database}: already trusted ({ca.nickname!r})"
    # C,,: a CA trusted to issue server certificates, nothing else (no e-mail, no code signing)
    _run([certutil, "-A", "-d", where, "-t", "C,,", "-n", ca.nickname, "-i", str(ca.path)])
    return f"NSS store {database}: added {ca.nickname!r}"


def _run_as_root(argv: Sequence[str]) -> None:
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise ConfigurationError(
                f"changing the system store needs root, and sudo is missing: run {argv[0]} as root"
            )
        argv = ["sudo", *argv]
    _run(argv)


def _run(argv: Sequence[str], check: bool = True) -> int:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigurationError(f"{' '.join(argv)} failed ({exc})") from None
    if check and done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigurationError(f"{' '.join(argv)} failed: {said[-1] if said else f'exit {done.returncode}'}")
    return done.returncode
