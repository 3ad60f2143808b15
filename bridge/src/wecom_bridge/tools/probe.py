"""Network probes for `doctor`: HTTP GETs and TLS handshakes that can be pointed at an address.

`--resolve host:port:addr` works like curl's: the connection goes to `addr` while the Host
header, SNI and the certificate's hostname check still use `host`, so a test (or an operator
before DNS is switched) can aim at a server without touching DNS.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode, urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from wecom_bridge.errors import BridgeError

DEFAULT_PORTS = {"http": 80, "https": 443}


class ProbeError(BridgeError):
    """A probe could not get an HTTP answer. `kind`: dns, refused, timeout, tls, network."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Fetched:
    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed: float  # seconds, connect included (WeCom has to connect too)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


@dataclass(frozen=True)
class CertInfo:
    not_after: datetime | None
    verified: bool
    problem: str = ""  # OpenSSL's verification message when not verified

    def days_left(self, now: datetime | None = None) -> float | None:
        if self.not_after is None:
            return None
        return (self.not_after - (now or datetime.now(UTC))).total_seconds() / 86400


def parse_resolve(spec: str) -> tuple[tuple[str, int], str]:
    """curl's `host:port:addr` (addr may be an IPv6 literal, with or without brackets)."""
    host, sep1, rest = spec.partition(":")
    port, sep2, addr = rest.partition(":")
    if not (sep1 and sep2 and host and port.isdigit() and addr):
        raise ValueError(f"--resolve must be host:port:address, got {spec!r}")
    return (host.lower(), int(port)), addr.strip("[]")


def split_host_port(netloc: str, default_port: int = 443) -> tuple[str, int]:
    """ "example.com" or "example.com:8443" (the domain as written in WeCom's console)."""
    parts = urlsplit(f"//{netloc}")
    if not parts.hostname:
        raise ValueError(f"not a host name: {netloc!r}")
    return parts.hostname.lower(), parts.port or default_port


@dataclass(frozen=True)
class Prober:
    resolve: Mapping[tuple[str, int], str] = field(default_factory=dict)
    ca_file: str | None = None
    timeout: float = 5.0

    def address(self, host: str, port: int) -> str:
        return self.resolve.get((host.lower(), port), host)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    # --- HTTP ------------------------------------------------------------------------------

    def get(self, url: str, params: Mapping[str, str] | None = None) -> Fetched:
        """One GET, redirects not followed, no retries; ProbeError when there is no answer."""
        parts = urlsplit(url)
        scheme, host = parts.scheme, (parts.hostname or "")
        port = parts.port or DEFAULT_PORTS.get(scheme, 80)
        query = "&".join(q for q in (parts.query, urlencode(params or {})) if q)
        target = (parts.path or "/") + (f"?{query}" if query else "")
        default = DEFAULT_PORTS.get(scheme) == port
        headers = {"Host": host if default else f"{host}:{port}", "User-Agent": "wecom-doctor"}
        timeout = urllib3.Timeout(connect=min(3.0, self.timeout), read=self.timeout)
        pool: urllib3.HTTPConnectionPool
        if scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                self.address(host, port),
                port,
                timeout=timeout,
                ssl_context=self.ssl_context(),
                server_hostname=host,
                assert_hostname=host,
                retries=False,
            )
        elif scheme == "http":
            pool = urllib3.HTTPConnectionPool(
                self.address(host, port), port, timeout=timeout, retries=False
            )
        else:
            raise ProbeError("network", f"not an http(s) URL: {url}")
        started = time.monotonic()
        try:
            with pool:
                response = pool.urlopen(
                    "GET", target, headers=headers, redirect=False, retries=False
                )
                body = response.data
        except HTTPError as exc:
            raise _probe_error(exc, host, port) from None
        return Fetched(response.status, dict(response.headers), body, time.monotonic() - started)

    # --- TLS -------------------------------------------------------------------------------

    def certificate(self, host: str, port: int) -> CertInfo:
        """The server's leaf certificate: verified against the trust and `host`, or why not."""
        addr = self.address(host, port)
        try:
            with self._tls(addr, port, host, self.ssl_context()) as tls:
                cert = tls.getpeercert() or {}
            expiry = cert.get("notAfter")
            not_after = (
                datetime.fromtimestamp(ssl.cert_time_to_seconds(str(expiry)), UTC)
                if expiry
                else None
            )
            return CertInfo(not_after, verified=True)
        except ssl.SSLCertVerificationError as exc:
            problem = exc.verify_message or str(exc)
        unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        with self._tls(addr, port, host, unverified) as tls:
            der = tls.getpeercert(binary_form=True) or b""
        return CertInfo(der_not_after(der), verified=False, problem=problem)

    def _tls(self, addr: str, port: int, host: str, context: ssl.SSLContext) -> ssl.SSLSocket:
        try:
            sock = socket.create_connection((addr, port), timeout=self.timeout)
        except OSError as exc:
            raise _socket_error(exc, host, port) from None
        try:
            return context.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError:
            sock.close()
            raise
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise ProbeError("tls", f"TLS handshake with {host}:{port} failed: {exc}") from None


def _socket_error(exc: OSError, host: str, port: int) -> ProbeError:
    if isinstance(exc, socket.gaierror):
        return ProbeError("dns", f"{host} does not resolve")
    if isinstance(exc, TimeoutError):
        return ProbeError("timeout", f"{host}:{port} did not answer (timeout)")
    if isinstance(exc, ConnectionRefusedError):
        return ProbeError("refused", f"{host}:{port} refused the connection")
    return ProbeError("network", f"{host}:{port}: {exc}")


def _probe_error(exc: HTTPError, host: str, port: int) -> ProbeError:
    if isinstance(exc, NameResolutionError):
        return ProbeError("dns", f"{host} does not resolve")
    if isinstance(exc, NewConnectionError):  # before ConnectTimeoutError: it subclasses it
        refused = "refused" in str(exc).lower()
        kind = "refused" if refused else "network"
        return ProbeError(kind, f"{host}:{port}: connection {'refused' if refused else 'failed'}")
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return ProbeError("timeout", f"{host}:{port} did not answer in time")
    if isinstance(exc, SSLError):
        reason = exc.args[0] if exc.args else exc
        message = getattr(reason, "verify_message", None) or str(reason)
        return ProbeError("tls", f"TLS with {host}:{port} failed: {message}")
    if isinstance(exc, ProtocolError):
        return ProbeError("network", f"{host}:{port} dropped the connection")
    return ProbeError("network", f"{host}:{port}: {type(exc).__name__}")


# --- a certificate's notAfter from DER, no third-party parser ------------------------------------


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at `pos`."""
    tag, length = der[pos], der[pos + 1]
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    return tag, start, start + length


def der_not_after(der: bytes) -> datetime | None:
    """Certificate → TBSCertificate → [version] serial sigalg issuer validity → notAfter."""
    try:
        _, cert_start, _ = _tlv(der, 0)
        _, pos, _ = _tlv(der, cert_start)
        tag, _, end = _tlv(der, pos)
        if tag == 0xA0:  # explicit version
            pos = end
        for _ in range(3):  # serialNumber, signature, issuer
            pos = _tlv(der, pos)[2]
        _, validity, _ = _tlv(der, pos)
        not_before_end = _tlv(der, validity)[2]
        tag, start, end = _tlv(der, not_before_end)
        text = der[start:end].decode("ascii")
        layout = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"
        return datetime.strptime(text, layout).replace(tzinfo=UTC)
    except (IndexError, ValueError):
        return None
