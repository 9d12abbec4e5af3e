"""Where burrow keeps its files (the dev CA, the ticket key), and how it writes secrets.

Kept apart from :mod:`burrow.certs`, which needs ``cryptography`` (~70 ms to
import): an agent only needs to know where the dev CA would be.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca-key.pem"


def data_dir() -> Path:
    """Where burrow keeps its files: ``$BURROW_HOME``, else the XDG data directory."""
    home = os.environ.get("BURROW_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "burrow"


def dev_ca_path() -> Path:
    """The dev CA certificate users trust (it may not exist yet)."""
    return data_dir() / CA_CERT_NAME


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` from the start (a key is never world-readable)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
