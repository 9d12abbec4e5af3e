"""The relay's TLS contexts: one for agents, one per tunnel host (dev) or shared (operator cert)."""

from __future__ import annotations

import shutil
import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from .config import RelayConfig

if TYPE_CHECKING:
    from ..certs import DevCA

#: ALPN protocol id of the agent endpoint: agents and browsers share port 443.
AGENT_ALPN = "burrow/1"

#: The same protocol, and the relay takes BINDs right behind HELLO (before its
#: WELCOME): an agent offered it saves a round trip when it connects. Offered
#: first by relays and agents that can; either end may still speak plain burrow/1.
EARLY_ALPN = "burrow/1+early"

#: What the agent endpoint offers (and an agent asks for), most wanted first.
AGENT_ALPNS = [EARLY_ALPN, AGENT_ALPN]

#: ALPN offered for tunnels opened with h2=True (the service speaks HTTP/2).
H2_ALPN = ["h2", "http/1.1"]
#: ALPN offered for the other tunnels. A client that offers neither gets no ALPN, not a
#: refusal (OpenSSL's server acknowledges nothing when nothing matches).
HTTP1_ALPN = ["http/1.1"]

#: Dev leaf contexts kept at once; a relay holding more tunnels re-issues on demand.
MAX_CACHED_CONTEXTS = 4096


#: TLS 1.2 suites: Mozilla's "intermediate" profile, AEAD with forward secrecy only
#: (OpenSSL's default also offers ECDHE with AES-CBC). TLS 1.3 suites are all AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _server_context(alpn: list[str] | None) -> ssl.SSLContext:
    # not create_default_context(): it loads the system CA store (tens of ms), useless to a server
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


class CertificateStore:
    """Gives the context for the agent endpoint and for each tunnel host."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.ca: DevCA | None = None
        self._dir: Path | None = None
        self._cache: dict[tuple[str, bool], ssl.SSLContext] = {}
        if config.cert is not None and config.key is not None:
            cert, key = str(config.cert), str(config.key)
            try:
                self.agent_context = _server_context(AGENT_ALPNS)
                self.agent_context.load_cert_chain(cert, key)
                self._shared = {}
                for h2 in (False, True):
                    self._shared[h2] = _server_context(H2_ALPN if h2 else HTTP1_ALPN)
                    self._shared[h2].load_cert_chain(cert, key)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
                raise ConfigurationError(
                    f"cannot load --cert {cert} with --key {key} ({reason}); give a PEM chain and its private key"
                ) from None
        else:
            from ..certs import DevCA  # only a dev relay needs cryptography (~70 ms to import)

            try:
                self.ca = DevCA.load_or_create(config.data_dir)
                # load_cert_chain reads files only: keep the leaves in a private directory
                self._dir = Path(tempfile.mkdtemp(prefix="burrow-relay-"))
                (self._dir / "key.pem").write_bytes(self.ca.leaf_key_pem)
                self.agent_context = self._dev_context(config.domain, AGENT_ALPNS)
            except OSError as exc:
                self.close()
                reason = (exc.strerror or str(exc)).lower()
                raise ConfigurationError(
                    f"cannot set up the dev CA in {config.data_dir or 'BURROW_HOME'} ({reason}); "
                    "check BURROW_HOME, or give --cert and --key"
                ) from None
            except ValueError as exc:  # cryptography: a PEM file that is not a certificate or an EC key
                self.close()
                raise ConfigurationError(
                    f"the dev CA in {config.data_dir or 'BURROW_HOME'} is damaged ({str(exc).splitlines()[0]}); "
                    "delete its ca.pem and ca-key.pem to make a new one"
                ) from None

    def reload(self, chain: bytes, key: bytes) -> None:
        """Serve a new operator chain and key from the next handshake on (ValueError: nothing changed).

        The pair is tried on a scratch context first: OpenSSL replaces a
        context's certificate before it checks the key, so a bad pair loaded
        straight into the live contexts would leave them half-changed.
        """
        if self.ca is not None:
            raise ValueError("this relay serves dev CA leaves, not an operator certificate")
        with tempfile.TemporaryDirectory(prefix="burrow-reload-") as scratch:
            cert_file, key_file = Path(scratch) / "cert.pem", Path(scratch) / "key.pem"
            cert_file.write_bytes(chain)
            key_file.touch(mode=0o600)
            key_file.write_bytes(key)
            try:
                _server_context(None).load_cert_chain(str(cert_file), str(key_file))
            except ssl.SSLError as exc:
                raise ValueError(exc.reason or str(exc)) from None
            for context in (self.agent_context, *self._shared.values()):
                context.load_cert_chain(str(cert_file), str(key_file))

    @property
    def ca_path(self) -> Path | None:
        """The dev CA certificate clients must trust, if this relay uses one."""
        return self.ca.path if self.ca is not None else None

    @property
    def per_host(self) -> bool:
        """True when every tunnel host needs a context of its own (dev CA)."""
        return self.ca is not None

    def tunnel_context(self, host: str, h2: bool) -> ssl.SSLContext:
        """The context that serves ``host`` (an ``<id>.<domain>`` name)."""
        if self.ca is None:
            return self._shared[h2]
        context = self._cache.get((host, h2))
        if context is None:
            context = self.make_context(host, h2)
            self.keep(host, h2, context)
        return context

    def make_context(self, host: str, h2: bool) -> ssl.SSLContext:
        """A new dev context for ``host`` (a few ms; safe to call from a worker thread)."""
        return self._dev_context(host, H2_ALPN if h2 else HTTP1_ALPN)

    def keep(self, host: str, h2: bool, context: ssl.SSLContext) -> None:
        """Cache a context made by :meth:`make_context` (on the loop thread)."""
        if len(self._cache) >= MAX_CACHED_CONTEXTS:
            self._cache.pop(next(iter(self._cache)))
        self._cache[(host, h2)] = context

    def forget(self, host: str) -> None:
        """Drop the cached contexts of a closed tunnel."""
        self._cache.pop((host, False), None)
        self._cache.pop((host, True), None)

    def close(self) -> None:
        """Remove the leaf files."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _dev_context(self, host: str, alpn: list[str] | None) -> ssl.SSLContext:
        assert self.ca is not None and self._dir is not None
        issued = self.ca.issue(host)
        cert_file = self._dir / f"{host}.pem"
        # the leaf alone: clients must trust the CA itself (a root), so sending it is
        # useless, and a client spends 0.3 of its 1.5 ms handshake parsing it
        cert_file.write_bytes(issued.cert_pem)
        context = _server_context(alpn)
        context.load_cert_chain(str(cert_file), str(self._dir / "key.pem"))
        cert_file.unlink()
        return context
