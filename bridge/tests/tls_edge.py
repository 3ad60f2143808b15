"""Test helpers for `doctor`: a private CA with good and bad certificates, and a tiny HTTPS edge
(the front nginx's part: WW_verify files at the root, the callback path proxied to the bridge)."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DOMAIN = "wecom.test"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path
    not_after: dt.datetime


class PrivateCA:
    """A private CA; `issue` makes leaf certificates with any names and validity."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("wecom-bridge test CA"))
            .issuer_name(_name("wecom-bridge test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=60))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, label: str, names: tuple[str, ...], days_from: float, days_to: float
    ) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        not_after = now + dt.timedelta(days=days_to)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days_from))
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        pair = CertPair(self.directory / f"{label}.pem", self.directory / f"{label}.key", not_after)
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return pair


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str = "text/plain"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class EdgeSpec:
    """What the edge serves: files by path, and the callback path proxied to `upstream`."""

    files: dict[str, StaticFile] = field(default_factory=dict)
    upstream: str | None = None
    callback_path: str = "/wxcomapp"
    rewrite: Callable[[str], str] = lambda path: path
    delay: float = 0.0
    suffix: bytes = b""  # appended to the upstream's answer (a broken proxy or framework)


class _Handler(BaseHTTPRequestHandler):
    spec: EdgeSpec

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        static = self.spec.files.get(path)
        if static is not None:
            self._answer(static.status, static.content_type, static.body, static.headers)
        elif self.spec.upstream and path == self.spec.callback_path:
            time.sleep(self.spec.delay)
            url = self.spec.upstream + self.spec.rewrite(path) + (f"?{query}" if query else "")
            got = requests.get(url, timeout=10)
            content_type = got.headers.get("Content-Type", "text/plain")
            self._answer(got.status_code, content_type, got.content + self.spec.suffix, {})
        else:
            self._answer(404, "text/html", b"<html>404 Not Found</html>", {})

    def _answer(self, status: int, content_type: str, body: bytes, headers: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class HttpsEdge:
    """An HTTPS server on 127.0.0.1 with the given certificate; `domain` is DOMAIN:port."""

    def __init__(self, pair: CertPair, spec: EdgeSpec) -> None:
        handler = type("EdgeHandler", (_Handler,), {"spec": spec})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert, pair.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.domain = f"{DOMAIN}:{self.port}"
        self.resolve = f"{DOMAIN}:{self.port}:127.0.0.1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HttpsEdge:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
