"""Dify's files, fetched safely: the images and documents an answer links to.

Dify's links are signed (`/files/<id>/file-preview?timestamp=&nonce=&sign=`, tools' files
`/files/tools/<id>.<ext>?…`, valid FILES_ACCESS_TIMEOUT = 5 minutes) and often relative unless
Dify's FILES_URL is set; they are resolved against the app's files base. An answer is text a
model wrote, so a link in it may point anywhere: only http(s) is fetched, and a host that is not
one of the configured Dify origins must resolve to public addresses only (no loopback, private,
link-local — 169.254.169.254 — or reserved ones). The connection goes to the address that was
checked (no second lookup), redirects are not followed, the size is capped while streaming
(decoded bytes, so a compressed bomb stops at the cap too) and the whole download has a deadline.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import urllib3

from wecom_bridge.errors import BridgeError

CHUNK_BYTES = 64 * 1024
USER_AGENT = "wecom-bridge (media)"
_FILENAME_STAR = re.compile(r"filename\*\s*=\s*[^']*'[^']*'([^;]+)", re.IGNORECASE)
_FILENAME = re.compile(r'filename\s*=\s*"?([^";]+)"?', re.IGNORECASE)

# (host, port) -> the addresses it resolves to
Resolver = Callable[[str, int], list[str]]


class FileFetchError(BridgeError):
    """A file that could not be fetched; `reason` says why, for logs and the member's text:
    refused (an unsafe address or scheme, a redirect), too_large, timeout, http, network."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FetchedFile:
    path: Path
    size: int
    content_type: str
    filename: str  # from Content-Disposition, else the URL's last path segment


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise FileFetchError("network", f"cannot resolve {host}: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an absolute URL, the port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def absolute(url: str, files_base: str) -> str:
    """`url` resolved against the files base (Dify's relative /files/… links)."""
    if urlsplit(url).scheme:
        return url
    return urljoin(files_base.rstrip("/") + "/", url.lstrip("/"))


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class DifyFileFetcher:
    """Downloads Dify's files within the limits above (see the module doc)."""

    def __init__(
        self,
        dify_origins: Sequence[str],
        *,
        timeout: float = 30.0,
        resolve: Resolver = system_resolver,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._trusted = {origin_of(url) for url in dify_origins if url}
        self._timeout = timeout
        self._resolve = resolve
        self._clock = clock

    def fetch(self, url: str, dest: Path, max_bytes: int) -> FetchedFile:
        """The file at `url`, written to `dest` (whole, or not at all)."""
        scheme, host, port = origin_of(url)
        if scheme not in ("http", "https") or not host:
            raise FileFetchError("refused", f"not an http(s) URL: {scheme or 'no scheme'}")
        address = self._checked_address(scheme, host, port)
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        pool = self._pool(scheme, address, port, host)
        host_header = parts.netloc.rsplit("@", 1)[-1]  # never credentials in a URL
        try:
            response = pool.urlopen(
                "GET",
                target,
                headers={"Host": host_header, "User-Agent": USER_AGENT, "Accept": "*/*"},
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=True,
            )
        except urllib3.exceptions.TimeoutError:
            raise FileFetchError("timeout", f"{host} did not answer in time") from None
        except urllib3.exceptions.HTTPError as exc:
            raise FileFetchError("network", f"{host}: {type(exc).__name__}") from None
        try:
            return self._save(response, url, dest, max_bytes)
        finally:
            response.release_conn()
            pool.close()

    def _checked_address(self, scheme: str, host: str, port: int) -> str:
        addresses = self._resolve(host, port)
        if not addresses:
            raise FileFetchError("network", f"{host} resolves to nothing")
        if (scheme, host, port) in self._trusted:
            return addresses[0]  # Dify itself, wherever it runs (often on this host)
        unsafe = [a for a in addresses if not is_public(a)]
        if unsafe:
            raise FileFetchError(
                "refused", f"{host} resolves to an internal address ({unsafe[0]}), not Dify's"
            )
        return addresses[0]

    def _pool(self, scheme: str, address: str, port: int, host: str) -> urllib3.HTTPConnectionPool:
        timeout = urllib3.Timeout(connect=min(10.0, self._timeout), read=self._timeout)
        if scheme == "https":
            # Connect to the checked address, but verify the certificate for the name.
            return urllib3.HTTPSConnectionPool(
                address,
                port,
                timeout=timeout,
                retries=False,
                server_hostname=host,
                assert_hostname=host,
                cert_reqs="CERT_REQUIRED",
            )
        return urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)

    def _save(
        self, response: urllib3.BaseHTTPResponse, url: str, dest: Path, max_bytes: int
    ) -> FetchedFile:
        if 300 <= response.status < 400:
            raise FileFetchError("refused", f"redirect (HTTP {response.status}) not followed")
        if response.status != 200:
            raise FileFetchError("http", f"HTTP {response.status}")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise FileFetchError("too_large", f"{declared} bytes (limit {max_bytes})")
        deadline = self._clock() + self._timeout
        partial = dest.with_name(dest.name + ".part")
        size = 0
        try:
            with partial.open("wb") as out:
                for chunk in response.stream(CHUNK_BYTES, decode_content=True):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileFetchError("too_large", f"over {max_bytes} bytes")
                    if self._clock() > deadline:
                        raise FileFetchError("timeout", f"download took over {self._timeout:g} s")
                    out.write(chunk)
            os.replace(partial, dest)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise FileFetchError("network", f"download broke: {type(exc).__name__}") from None
        finally:
            partial.unlink(missing_ok=True)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        return FetchedFile(dest, size, content_type, _filename(response, url))


def _filename(response: urllib3.BaseHTTPResponse, url: str) -> str:
    disposition = response.headers.get("Content-Disposition", "")
    match = _FILENAME_STAR.search(disposition) or _FILENAME.search(disposition)
    name = unquote(match.group(1)) if match else unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    name = Path(name.replace("\\", "/")).name.strip()  # never a path
    return name[:128] or "file"
