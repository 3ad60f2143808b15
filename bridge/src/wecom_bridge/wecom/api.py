"""Client for WeCom's server API (gettoken, message/send, ...).

Access tokens are cached until shortly before they expire, refreshed by one thread at a time and
persisted through a TokenCache so restarts do not call gettoken (WeCom blocks callers that do it
too often). A cache shared by several bridges (PostgreSQL) also makes it one bridge at a time:
the others wait for its lock and then take the token it stored. Errors only the admin can fix
are reported once and not retried for a while.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from email.message import Message
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

import requests

from wecom_bridge.errors import WeComApiError, WeComConfigError
from wecom_bridge.http_session import session_for
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom.errcodes import Handling, codes, hint_for, ip_in, lookup
from wecom_bridge.wecom.messages import OutboundMessage, SendResult
from wecom_bridge.wecom.uploads import UploadedMedia

log = logging.getLogger("wecom_bridge.wecom")

DEFAULT_API_BASE = "https://qyapi.weixin.qq.com"

TOKEN_ERRCODES = codes(Handling.TOKEN)
# Refresh this long before WeCom's expiry (never more than half the lifetime).
TOKEN_MARGIN = 300.0
MEDIA_CHUNK = 64 * 1024


@dataclass(frozen=True)
class DownloadedMedia:
    """What media/get said about the bytes it wrote."""

    size: int
    content_type: str
    filename: str


class MediaTooLargeError(WeComApiError):
    """The download passed the caller's size cap (nothing more was read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(None, f"media larger than {limit} bytes", retryable=False)
        self.limit = limit


def filename_of(disposition: str) -> str:
    """The file name of a Content-Disposition header (RFC 6266, filename* preferred)."""
    header = Message()
    header["content-disposition"] = disposition
    name = header.get_filename() or ""
    # A server that sent the name's UTF-8 bytes raw: HTTP clients read them as latin-1.
    with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
        name = name.encode("latin-1").decode("utf-8")
    return name.replace("/", "_").replace("\\", "_").strip()


class TokenCache(Protocol):
    def get_token(self, key: str) -> tuple[str, float] | None: ...

    def put_token(self, key: str, token: str, expires_at: float) -> None: ...

    def drop_token(self, key: str, token: str) -> None:
        """Forget `token` unless the entry already holds another one."""
        ...

    def refresh_lock(self, key: str) -> AbstractContextManager[None]:
        """Held while one refresher calls gettoken for `key` (across processes and hosts)."""
        ...


class MemoryTokenCache:
    """A TokenCache that lives as long as the process (tests, one-shot CLI commands)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}

    def get_token(self, key: str) -> tuple[str, float] | None:
        with self._lock:
            return self._tokens.get(key)

    def put_token(self, key: str, token: str, expires_at: float) -> None:
        with self._lock:
            self._tokens[key] = (token, expires_at)

    def drop_token(self, key: str, token: str) -> None:
        with self._lock:
            if key in self._tokens and self._tokens[key][0] == token:
                del self._tokens[key]

    def refresh_lock(self, key: str) -> AbstractContextManager[None]:
        return nullcontext()  # one process: the client's thread lock is enough


def config_error(errcode: int, errmsg: str) -> WeComConfigError | None:
    """The admin-only errors, with a hint saying what to change; None for other errcodes."""
    if lookup(errcode).handling is not Handling.ADMIN:
        return None
    ip = ip_in(errmsg) if errcode == 60020 else None
    return WeComConfigError(errcode, errmsg, hint=hint_for(errcode, errmsg), ip=ip)


def _safe_url(url: str) -> str:
    """The URL without its query string: that is where the secret and the token travel."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class WeComClient:
    def __init__(
        self,
        *,
        api_base: str,
        corp_id: str,
        secret: str,
        token_cache: TokenCache,
        metrics: Metrics | None = None,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (3.05, 10.0),
        max_attempts: int = 4,
        backoff_base: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        config_error_cooldown: float = 60.0,
        connections: int = 10,
    ) -> None:
        """`connections`: kept open to WeCom, as many as threads that call at once."""
        self._base = (api_base or DEFAULT_API_BASE).rstrip("/")
        self._corp_id = corp_id
        self._secret = secret
        self._cache = token_cache
        self._cache_key = f"{corp_id}:{hashlib.sha256(secret.encode()).hexdigest()[:16]}"
        self._metrics = metrics or Metrics()
        self._session = session or session_for(self._base, connections=connections)
        self._timeout = timeout
        self._max_attempts = max(1, max_attempts)
        self._backoff_base = backoff_base
        self._sleep = sleep
        self._clock = clock
        self._cooldown = config_error_cooldown
        self._refresh_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._token: tuple[str, float] | None = None
        self._config_error: tuple[WeComConfigError, float] | None = None
        self._reported: tuple[int | None, str] | None = None
        self._jitter = random.Random()  # noqa: S311 - backoff jitter, not security

    # --- token -----------------------------------------------------------------------------

    def access_token(self) -> str:
        """A valid token; at most one gettoken in flight, other callers wait and reuse it."""
        token = self._cached_token()
        if token:
            return token
        with self._refresh_lock:
            token = self._cached_token()
            if token:
                return token
            self._raise_if_cooling_down()
            with self._cache.refresh_lock(self._cache_key):
                # Another bridge may have refreshed while this one waited for the lock.
                entry = self._cache.get_token(self._cache_key)
                if entry is not None and self._clock() < entry[1]:
                    with self._state_lock:
                        self._token = entry
                    return entry[0]
                return self._refresh()

    def _cached_token(self) -> str | None:
        with self._state_lock:
            entry = self._token
        if entry is None:
            entry = self._cache.get_token(self._cache_key)
            if entry is not None:
                with self._state_lock:
                    self._token = entry
        if entry is not None and self._clock() < entry[1]:
            return entry[0]
        return None

    def _invalidate(self, token: str) -> None:
        """Drop `token` unless another thread already replaced it."""
        with self._state_lock:
            if self._token is not None and self._token[0] != token:
                return
            self._token = None
        self._cache.drop_token(self._cache_key, token)

    def _refresh(self) -> str:
        data = self._request(
            "GET", "/cgi-bin/gettoken", params={"corpid": self._corp_id, "corpsecret": self._secret}
        )
        errcode = int(data.get("errcode", 0) or 0)
        if errcode:
            raise self._api_error(errcode, str(data.get("errmsg", "")))
        token = str(data.get("access_token", ""))
        if not token:
            raise WeComApiError(None, "gettoken answered without access_token", retryable=True)
        lifetime = float(data.get("expires_in", 7200) or 7200)
        expires_at = self._clock() + max(lifetime - TOKEN_MARGIN, lifetime / 2)
        with self._state_lock:
            self._token = (token, expires_at)
            self._config_error = None
            self._reported = None
        self._cache.put_token(self._cache_key, token, expires_at)
        self._metrics.inc("wecom_bridge_token_refreshes_total")
        log.info("fetched a WeCom access token (valid for %ds)", int(lifetime))
        return token

    def _raise_if_cooling_down(self) -> None:
        with self._state_lock:
            active = self._config_error
        if active is not None and self._clock() < active[1]:
            raise active[0]

    # --- calls -----------------------------------------------------------------------------

    def call(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """One authenticated API call; a rejected token is replaced and the call retried once."""
        self._raise_if_cooling_down()
        for first in (True, False):
            token = self.access_token()
            data = self._request(
                method, path, params={**(params or {}), "access_token": token}, **kwargs
            )
            errcode = int(data.get("errcode", 0) or 0)
            if errcode in TOKEN_ERRCODES and first:
                log.info("WeCom rejected the access token (errcode %d); refreshing", errcode)
                self._invalidate(token)
                continue
            if errcode:
                raise self._api_error(errcode, str(data.get("errmsg", "")))
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    def send(self, message: OutboundMessage) -> SendResult:
        """message/send with backoff on transient failures; raises WeComApiError at the end."""
        for attempt in range(1, self._max_attempts + 1):
            try:
                data = self.call("POST", "/cgi-bin/message/send", json=message.payload())
            except WeComApiError as exc:
                code = "network" if exc.errcode is None else str(exc.errcode)
                self._metrics.inc("wecom_bridge_wecom_send_errors_total", {"errcode": code})
                if not exc.retryable or attempt == self._max_attempts or exc.retry_after:
                    raise  # a frequency block is waited out by the caller, not in seconds
                delay = self._backoff_base * 2 ** (attempt - 1) * self._jitter.uniform(1.0, 1.5)
                log.warning(
                    "message/send failed (errcode %s), attempt %d/%d, retrying in %.1fs",
                    code,
                    attempt,
                    self._max_attempts,
                    delay,
                )
                self._sleep(delay)
                continue
            result = _send_result(message, data)
            if result.delivered:
                self._metrics.inc("wecom_bridge_wecom_messages_sent_total")
            else:
                self._metrics.inc(
                    "wecom_bridge_wecom_undelivered_total", {"reason": "unlicenseduser"}
                )
            if result.invaliduser:
                log.warning("message/send: WeCom reports invalid users %s", result.invaliduser)
            if result.unlicenseduser:
                log.warning(
                    "message/send: recipients without an interface licence (not delivered): %s",
                    result.unlicenseduser,
                )
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    # --- media out -----------------------------------------------------------------------

    def upload_media(
        self, kind: str, data: bytes, filename: str, content_type: str
    ) -> UploadedMedia:
        """media/upload (multipart field `media`): a media_id valid for 3 days. The bytes are
        given whole so that a retry after a token refresh sends them again."""
        data_out = self.call(
            "POST",
            "/cgi-bin/media/upload",
            params={"type": kind},
            files={"media": (filename, data, content_type or "application/octet-stream")},
        )
        media_id = str(data_out.get("media_id") or "")
        if not media_id:
            raise WeComApiError(None, "media/upload answered without media_id", retryable=True)
        try:
            created_at = float(data_out.get("created_at") or self._clock())
        except (TypeError, ValueError):
            created_at = self._clock()
        self._metrics.inc("wecom_bridge_media_uploads_total", {"type": kind})
        return UploadedMedia(media_id, created_at, str(data_out.get("type") or kind))

    def download_media(self, media_id: str, dest: IO[bytes], max_bytes: int) -> DownloadedMedia:
        """media/get: write an inbound image, voice or file (MediaId, valid 3 days) to `dest`,
        at most `max_bytes` of it (MediaTooLargeError beyond). WeCom answers an error
        (40007: invalid or expired media_id) as JSON instead of the bytes."""
        self._raise_if_cooling_down()
        for first in (True, False):
            token = self.access_token()
            params = {"access_token": token, "media_id": media_id}
            url = self._base + "/cgi-bin/media/get"
            try:
                response = self._session.get(url, params=params, timeout=self._timeout, stream=True)
            except requests.RequestException as exc:
                log.warning("GET %s failed: %s", _safe_url(url), type(exc).__name__)
                raise WeComApiError(
                    None, f"network error: {type(exc).__name__}", retryable=True
                ) from None
            with response:
                if response.status_code >= 400:
                    retryable = response.status_code >= 500 or response.status_code == 429
                    raise WeComApiError(None, f"HTTP {response.status_code}", retryable=retryable)
                kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if kind in ("application/json", "text/plain"):
                    data = self._json_error(response.content[:4096])
                    errcode = int(data.get("errcode", 0) or 0)
                    if errcode in TOKEN_ERRCODES and first:
                        self._invalidate(token)
                        continue
                    raise self._api_error(errcode or -1, str(data.get("errmsg", "")))
                size = _copy_capped(response, dest, max_bytes)
                return DownloadedMedia(
                    size, kind, filename_of(response.headers.get("Content-Disposition", ""))
                )
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _json_error(raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError:
            raise WeComApiError(None, "media/get answered neither media nor JSON") from None
        return data if isinstance(data, dict) else {}

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = self._base + path
        try:
            response = self._session.request(method, url, timeout=self._timeout, **kwargs)
        except requests.RequestException as exc:
            # The exception text may contain the URL with its query: log only the type.
            log.warning("%s %s failed: %s", method, _safe_url(url), type(exc).__name__)
            raise WeComApiError(
                None, f"network error: {type(exc).__name__}", retryable=True
            ) from None
        if response.status_code >= 400:
            retryable = response.status_code >= 500 or response.status_code == 429
            log.warning("%s %s answered HTTP %d", method, _safe_url(url), response.status_code)
            raise WeComApiError(None, f"HTTP {response.status_code}", retryable=retryable)
        try:
            data = response.json()
        except ValueError:
            raise WeComApiError(None, "answer is not JSON", retryable=True) from None
        if not isinstance(data, dict):
            raise WeComApiError(None, "answer is not a JSON object", retryable=True)
        return data

    def _api_error(self, errcode: int, errmsg: str) -> WeComApiError:
        problem = config_error(errcode, errmsg)
        if problem is None:
            # A token rejected again right after a refresh is WeCom having a moment: back off.
            entry = lookup(errcode)
            retryable = entry.handling in (Handling.RETRY, Handling.TOKEN)
            return WeComApiError(
                errcode, errmsg, retryable=retryable, retry_after=entry.blocked_for
            )
        with self._state_lock:
            self._config_error = (problem, self._clock() + self._cooldown)
            first = self._reported != (errcode, problem.hint)
            self._reported = (errcode, problem.hint)
        if first:
            log.error(
                "WeCom configuration error %d: %s (WeCom said: %s)", errcode, problem.hint, errmsg
            )
        else:
            log.debug("WeCom configuration error %d persists", errcode)
        return problem


def _copy_capped(response: requests.Response, dest: IO[bytes], max_bytes: int) -> int:
    """Copy the body to `dest`; MediaTooLargeError as soon as it passes `max_bytes`."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise MediaTooLargeError(max_bytes)
    size = 0
    try:
        for chunk in response.iter_content(MEDIA_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise MediaTooLargeError(max_bytes)
            dest.write(chunk)
    except requests.RequestException as exc:
        raise WeComApiError(None, f"download broke: {type(exc).__name__}", retryable=True) from None
    return size


def _send_result(message: OutboundMessage, data: dict[str, Any]) -> SendResult:
    """message/send's answer; `delivered` is False when only users were named and each was
    invalid or unlicensed (WeCom answers errcode 0 and delivers nothing)."""
    fields = {
        key: str(data.get(key, "") or "")
        for key in ("invaliduser", "invalidparty", "invalidtag", "unlicenseduser")
    }
    named = {u for u in message.touser.split("|") if u}
    undeliverable = {
        u for key in ("invaliduser", "unlicenseduser") for u in fields[key].split("|") if u
    }
    only_users = not (message.toparty or message.totag)
    nobody = bool(fields["unlicenseduser"]) and only_users and named <= undeliverable
    return SendResult(msgid=str(data.get("msgid", "")), delivered=not nobody, **fields)
