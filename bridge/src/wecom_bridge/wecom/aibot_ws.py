"""The AI bot's long connection: the bridge connects out, subscribes, keeps the heartbeat and
reconnects with backoff; WeCom pushes messages and acknowledges every frame the bot sends.

One thread runs the connection (`run`): connect → `aibot_subscribe` → read frames until the
socket drops, then wait (exponential backoff with jitter) and start again. Frames WeCom pushes
go to `on_frame`; acks are matched to `request` calls by req_id. Frames sharing a req_id (the
updates of one stream) are sent one at a time, each after the previous one's ack, as WeCom
expects. The state (subscribed, or why not) goes to `on_state` on every change.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from wecom_bridge.errors import WeComApiError
from wecom_bridge.wecom import aibot_frames as frames
from wecom_bridge.wecom.aibot_frames import AibotFrameError, Frame
from wecom_bridge.wecom.errcodes import lookup

log = logging.getLogger("wecom_bridge.aibot")

HEARTBEAT_SECONDS = 30.0  # WeCom's: a ping every 30 s
MISSED_PONGS = 2  # this many unanswered pings in a row: the connection is dead
ACK_TIMEOUT = 5.0  # WeCom acks a frame within seconds; the SDK waits 5 s
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
# Taken over by another connection: that holder is not one of ours (ours share one lease), so
# coming back at once would only kick it off again. Come back slowly, and say so loudly.
TAKEOVER_BACKOFF = 60.0


class LinkState(StrEnum):
    CONNECTING = "connecting"
    SUBSCRIBED = "subscribed"
    AUTH_FAILED = "auth_failed"  # wrong bot id or secret
    TAKEN_OVER = "taken_over"  # a newer connection subscribed the same bot
    DISCONNECTED = "disconnected"  # network down, WeCom unreachable, socket dropped
    STANDBY = "standby"  # another bridge process holds the bot's connection
    STOPPED = "stopped"


_FAILURES = frozenset({LinkState.AUTH_FAILED, LinkState.TAKEN_OVER, LinkState.DISCONNECTED})
_LOG_LEVELS = {
    LinkState.CONNECTING: logging.INFO,
    LinkState.SUBSCRIBED: logging.INFO,
    LinkState.STANDBY: logging.INFO,
    LinkState.STOPPED: logging.INFO,
    LinkState.AUTH_FAILED: logging.ERROR,
    LinkState.TAKEN_OVER: logging.ERROR,
}


class NotSubscribedError(WeComApiError):
    """No subscribed connection right now: the frame was not sent (retry later)."""

    def __init__(self, state: str) -> None:
        super().__init__(None, f"AI bot long connection not subscribed ({state})", retryable=True)


def refused(frame: Frame) -> WeComApiError:
    """WeCom's non-zero ack as the API error the pipeline handles."""
    code = frame.errcode or 0
    entry = lookup(code)
    return WeComApiError(code, frame.errmsg or entry.meaning, retryable=entry.handling == "retry")


@dataclass
class _Pending:
    done: threading.Event
    ack: Frame | None = None


class AibotConnection:
    def __init__(
        self,
        url: str,
        bot_id: str,
        secret: str,
        on_frame: Callable[[Frame], None],
        *,
        on_state: Callable[[LinkState, str], None] = lambda state, detail: None,
        may_connect: Callable[[], bool] = lambda: True,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        ack_timeout: float = ACK_TIMEOUT,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.url = url
        self._bot_id = bot_id
        self._secret = secret
        self._on_frame = on_frame
        self._on_state = on_state
        self._may_connect = may_connect
        self._heartbeat = heartbeat_seconds
        self._ack_timeout = ack_timeout
        self._backoff_first = backoff_first
        self._backoff_max = backoff_max
        self._jitter = random.Random()  # noqa: S311 - backoff jitter, not security
        self._stopping = threading.Event()
        self._ws: ClientConnection | None = None
        self._subscribed = threading.Event()
        self._state = LinkState.CONNECTING
        self._pending: dict[str, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._req_locks: dict[str, threading.Lock] = {}
        self._thread: threading.Thread | None = None

    # --- the pipeline's side -------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        return self._state

    def request(self, frame: Frame) -> Frame:
        """Send `frame` and wait for WeCom's ack. Raises NotSubscribedError (nothing sent),
        WeComApiError (WeCom refused it, or no ack in time: retryable)."""
        with self._req_lock(frame.req_id):
            ws = self._ws
            if ws is None or not self._subscribed.is_set():
                raise NotSubscribedError(self._state)
            pending = _Pending(threading.Event())
            with self._pending_lock:
                self._pending[frame.req_id] = pending
            try:
                try:
                    ws.send(frame.to_json())
                except ConnectionClosed:
                    raise NotSubscribedError("connection closed") from None
                if not pending.done.wait(self._ack_timeout) or pending.ack is None:
                    raise WeComApiError(None, f"no ack for {frame.cmd} in time", retryable=True)
            finally:
                with self._pending_lock:
                    self._pending.pop(frame.req_id, None)
        if pending.ack.errcode:
            raise refused(pending.ack)
        return pending.ack

    def _req_lock(self, req_id: str) -> threading.Lock:
        with self._pending_lock:
            if len(self._req_locks) > 10_000:  # locks of long-finished streams
                self._req_locks = {k: v for k, v in self._req_locks.items() if v.locked()}
            return self._req_locks.setdefault(req_id, threading.Lock())

    # --- the connection's thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="aibot-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self.close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._set_state(LinkState.STOPPED, "")

    def close(self) -> None:
        """Drop the current connection (the thread reconnects unless stopping)."""
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()

    def run(self) -> None:
        delay = self._backoff_first
        while not self._stopping.is_set():
            if not self._may_connect():
                self._set_state(LinkState.STANDBY, "another bridge process holds the connection")
                self._stopping.wait(self._backoff_first)
                continue
            outcome = self._session()
            if self._stopping.is_set():
                return
            if outcome == LinkState.SUBSCRIBED:  # it was up a while: start over from the top
                delay = self._backoff_first
            pause = TAKEOVER_BACKOFF if self._state == LinkState.TAKEN_OVER else delay
            pause *= self._jitter.uniform(0.8, 1.2)
            log.info(
                "AI bot long connection: reconnecting",
                extra={"event": "aibot_reconnect", "state": self._state, "in_seconds": pause},
            )
            self._stopping.wait(pause)
            delay = min(self._backoff_max, delay * 2)

    def _session(self) -> LinkState | None:
        """One connection from connect to close; SUBSCRIBED when it got that far."""
        self._set_state(LinkState.CONNECTING, self.url)
        try:
            ws = connect(self.url, open_timeout=10, close_timeout=2, max_size=2**22)
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            self._set_state(LinkState.DISCONNECTED, f"cannot connect: {type(exc).__name__}: {exc}")
            return None
        self._ws = ws
        try:
            if not self._subscribe(ws):
                return None
            self._read(ws)
            return LinkState.SUBSCRIBED
        finally:
            self._subscribed.clear()
            self._ws = None
            with contextlib.suppress(Exception):
                ws.close()
            self._fail_pending()

    def _subscribe(self, ws: ClientConnection) -> bool:
        request = frames.subscribe(self._bot_id, self._secret)
        try:
            ws.send(request.to_json())
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                frame = frames.parse_frame(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if frame.req_id == request.req_id:
                    break
            else:
                raise TimeoutError("no answer to aibot_subscribe")
        except (ConnectionClosed, TimeoutError, AibotFrameError, OSError) as exc:
            self._set_state(LinkState.DISCONNECTED, f"subscribe failed: {type(exc).__name__}")
            return False
        if frame.errcode:
            self._set_state(
                LinkState.AUTH_FAILED,
                f"WeCom refused the subscription: errcode {frame.errcode} {frame.errmsg} "
                "(check WECOM_AIBOT_BOT_ID and WECOM_AIBOT_SECRET)",
            )
            return False
        self._subscribed.set()
        self._set_state(LinkState.SUBSCRIBED, "")
        return True

    def _read(self, ws: ClientConnection) -> None:
        next_ping = time.monotonic() + self._heartbeat
        unanswered: set[str] = set()
        while not self._stopping.is_set():
            if time.monotonic() >= next_ping:
                if len(unanswered) >= MISSED_PONGS:
                    self._set_state(LinkState.DISCONNECTED, "heartbeat unanswered")
                    return
                beat = frames.ping()
                unanswered.add(beat.req_id)
                try:
                    ws.send(beat.to_json())
                except ConnectionClosed:
                    self._set_state(LinkState.DISCONNECTED, "connection closed")
                    return
                next_ping = time.monotonic() + self._heartbeat
            try:
                raw = ws.recv(timeout=min(1.0, max(0.05, next_ping - time.monotonic())))
            except TimeoutError:
                continue
            except ConnectionClosed as exc:
                if self._state != LinkState.TAKEN_OVER:
                    self._set_state(LinkState.DISCONNECTED, f"connection closed ({exc.rcvd})")
                return
            try:
                frame = frames.parse_frame(raw)
            except AibotFrameError as exc:
                log.warning("AI bot: unreadable frame ignored", extra={"error": str(exc)})
                continue
            unanswered.discard(frame.req_id)
            if self._dispatch(frame):
                return

    def _dispatch(self, frame: Frame) -> bool:
        """Hand one frame on; True when the connection is over (taken over)."""
        if not frame.cmd:
            with self._pending_lock:
                pending = self._pending.get(frame.req_id)
            if pending is not None:
                pending.ack = frame
                pending.done.set()
            return False
        if frame.cmd == frames.CMD_EVENT_CALLBACK:
            event = frame.body.get("event")
            if isinstance(event, dict) and event.get("eventtype") == frames.EVENT_DISCONNECTED:
                self._set_state(
                    LinkState.TAKEN_OVER,
                    "another connection subscribed this bot (another bridge or tool with the "
                    "same WECOM_AIBOT_BOT_ID?)",
                )
                return True
        try:
            self._on_frame(frame)
        except Exception:
            log.exception("AI bot: frame handler failed", extra={"cmd": frame.cmd})
        return False

    def _fail_pending(self) -> None:
        with self._pending_lock:
            waiting = list(self._pending.values())
        for pending in waiting:
            pending.done.set()  # no ack: request() reports it as retryable

    def _set_state(self, state: LinkState, detail: str) -> None:
        """Record the state; log each change (and every repeated failure: each is news)."""
        changed = state != self._state
        self._state = state
        if changed or state in _FAILURES:
            log.log(
                _LOG_LEVELS.get(state, logging.WARNING),
                f"AI bot long connection: {state}" + (f": {detail}" if detail else ""),
                extra={"event": "aibot_state", "state": str(state)},
            )
        with contextlib.suppress(Exception):  # a report that fails must not stop the link
            self._on_state(state, detail)


def probe_subscription(url: str, bot_id: str, secret: str, timeout: float = 10.0) -> Frame:
    """Connect, subscribe once and return WeCom's answer (for `doctor`). Note: a subscription
    takes the bot over from whichever connection held it."""
    with connect(url, open_timeout=timeout, close_timeout=2) as ws:
        request = frames.subscribe(bot_id, secret)
        ws.send(request.to_json())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer to aibot_subscribe")
            frame = frames.parse_frame(ws.recv(timeout=left))
            if frame.req_id == request.req_id:
                return frame
