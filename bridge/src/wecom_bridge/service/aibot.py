"""The AI bot's long connections, in the job process: one per bot, held by one process.

Each bot's connection is a `Store.exclusive` role, so of all the processes that share the store
exactly one connects; the others stand by and take over once the holder died or stopped (the
role is free again). The holder reports the connection's state to the store (`set_link_state`)
on every change and every few seconds, for /readyz on any bridge. What WeCom pushes is stored
— deduplicated on its msgid, in a synced commit — before anything else happens to it; then the
workers are woken and answer it through the bot's outbound, on the same connection.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from wecom_bridge.channels.aibot import inbound_message
from wecom_bridge.config import AppConfig
from wecom_bridge.errors import StoreUnavailableError
from wecom_bridge.jobs.kinds import new_job
from wecom_bridge.jobs.routing import route
from wecom_bridge.jobs.store import NewJob, Store
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom import aibot_frames as frames
from wecom_bridge.wecom.aibot_frames import AibotFrameError, Frame
from wecom_bridge.wecom.aibot_ws import AibotConnection, LinkState

log = logging.getLogger("wecom_bridge.aibot")

# The holder checks it still holds the role, and reports the state again, this often; /readyz
# takes a report older than web.ops.LINK_REPORT_MAX_AGE for "no process holds it".
REPORT_SECONDS = 5.0
STORE_RETRY_SECONDS = 0.2
STORE_GIVE_UP_SECONDS = 60.0  # WeCom does not redeliver a pushed frame: keep trying a while


def link_name(app: AppConfig) -> str:
    assert app.aibot is not None  # noqa: S101 - AI-bot apps only
    return f"aibot:{app.aibot.bot_id}"


class AibotLink:
    """One bot's connection: its exclusive role, the intake of pushed frames, the state report."""

    def __init__(
        self,
        app: AppConfig,
        store: Store,
        metrics: Metrics,
        *,
        report_seconds: float = REPORT_SECONDS,
        heartbeat_seconds: float = 30.0,
        backoff_first: float = 1.0,
    ) -> None:
        assert app.aibot is not None  # noqa: S101 - AI-bot apps only
        self.app = app
        self.name = link_name(app)
        self.store = store
        self.metrics = metrics
        self.owner = uuid.uuid4().hex
        self.notify: Callable[[int], None] = lambda jobs: None  # set once the workers exist
        self._report_seconds = report_seconds
        self._role = store.exclusive(self.name)
        self._role_lock = threading.Lock()  # the connection and report threads both use it
        self._reported = (LinkState.STANDBY, "")
        self.holding = False  # whether this process holds the role (workers read it often)
        self._stopping = threading.Event()
        self.connection = AibotConnection(
            app.aibot.ws_url,
            app.aibot.bot_id,
            app.aibot.secret,
            self._arrived,
            on_state=self._report,
            may_connect=self._hold,
            heartbeat_seconds=heartbeat_seconds,
            backoff_first=backoff_first,
        )

    def start(self) -> None:
        self.connection.start()
        threading.Thread(target=self._keep, name="aibot-role", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        self.connection.stop()  # reports "stopped" while still holding the role
        with self._role_lock:
            self.holding = False
            self._role.release()  # a successor process takes the connection over

    def _hold(self) -> bool:
        """Whether this process holds (or now took) the bot's connection role."""
        try:
            with self._role_lock:
                held = self._role.try_acquire()
        except StoreUnavailableError as exc:
            log.error("store unavailable: not connecting the AI bot", extra={"error": str(exc)})
            held = False
        if held and not self.holding:
            self.notify(1)  # the bot's waiting jobs are this process's to answer now
        self.holding = held
        return held

    def _held(self) -> bool:
        with self._role_lock:
            self.holding = self._role.held()
            return self.holding

    def _keep(self) -> None:
        """Drop the connection once the role is lost (e.g. PostgreSQL restarted: another
        bridge may hold it now), and keep the state report fresh while holding it."""
        while not self._stopping.wait(self._report_seconds):
            if self.connection.state == LinkState.STANDBY:
                continue  # the connection thread asks for the role itself
            if not self._held():
                log.error(
                    "AI bot: lost the connection's role to another process; disconnecting",
                    extra={"event": "aibot_role_lost", "app": self.app.name},
                )
                self.connection.close()
                continue
            self._record(*self._reported)

    def _report(self, state: LinkState, detail: str) -> None:
        self.metrics.inc(
            "wecom_bridge_aibot_link_changes_total", {"app": self.app.name, "state": str(state)}
        )
        self._reported = (state, detail)
        if state != LinkState.STANDBY and self._held():  # a standby leaves the holder's alone
            self._record(state, detail)

    def _record(self, state: LinkState, detail: str) -> None:
        try:
            self.store.set_link_state(self.name, self.owner, str(state), detail)
        except StoreUnavailableError:
            log.warning("could not record the AI bot's connection state")

    # --- what WeCom pushes ---------------------------------------------------------------------

    def _arrived(self, frame: Frame) -> None:
        if frame.cmd not in (frames.CMD_MSG_CALLBACK, frames.CMD_EVENT_CALLBACK):
            log.info("AI bot: frame ignored", extra={"cmd": frame.cmd})
            return
        try:
            message = frames.parse_message(frame.body)
        except AibotFrameError as exc:
            log.warning("AI bot: unreadable callback ignored", extra={"error": str(exc)})
            return
        if not message.msgid:
            log.warning("AI bot: callback without msgid ignored", extra={"cmd": frame.cmd})
            return
        inbound = inbound_message(self.app, message, frame.req_id)
        spec = route(inbound, self.app.replies)
        job = new_job(inbound.sender, spec) if spec is not None else None
        job_id = self._store(inbound.dedupe_key, job)
        outcome = "duplicate" if job_id is None else ("accepted" if job_id else "ignored")
        self.metrics.inc("wecom_bridge_callbacks_total", {"app": self.app.name, "outcome": outcome})
        log.info(
            "AI bot message stored" if job_id else f"AI bot message {outcome}",
            extra={
                "event": "aibot_inbound",
                "app": self.app.name,
                "user": inbound.sender,
                "msg_id": inbound.msg_id,
                "msg_type": inbound.msg_type,
                "job_id": job_id,
            },
        )
        if job_id:
            self.notify(1)

    def _store(self, key: str, job: NewJob | None) -> int | None:
        """Store the arrival, waiting out a busy or unavailable store for a while: WeCom
        pushes a frame once, so giving up at the first error would lose the message."""
        waited = 0.0
        while True:
            try:
                return self.store.accept(self.app.name, key, job)
            except StoreUnavailableError as exc:
                if waited >= STORE_GIVE_UP_SECONDS or self._stopping.is_set():
                    log.error(
                        "AI bot message lost: the store stayed unavailable",
                        extra={"event": "aibot_lost", "key": key, "error": str(exc)},
                    )
                    return 0
                self._stopping.wait(STORE_RETRY_SECONDS)
                waited += STORE_RETRY_SECONDS
