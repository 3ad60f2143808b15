"""微信客服 (kf) jobs: the pull, the hand-over to a human servicer and the welcome.

The pull job of a kf account calls kf/sync_msg from the stored cursor (with the callback's token
while it is valid) and follows has_more; each page's customer messages become jobs in their
customers' lines, deduplicated by msgid, stored in one transaction with the page's next_cursor.
A crash before that commit pulls the page again; after it, the page is never pulled again. Only
one pull per account runs at a time: its jobs share the account's pull line.

With an empty store (no cursor yet) and `start = now`, messages sent before the callback that
woke the bridge (less the token's 10 minutes) are skipped: WeCom would hand out three days of
history, and customers should not get answers to questions they asked last week.

While a human servicer holds a session (or it waits in the servicer pool), the customer's
messages are stored for dedupe but get no job: the bot stays silent until the session returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wecom_bridge.channels.kf import customer_line, parse_customer_line
from wecom_bridge.config import KfConfig
from wecom_bridge.errors import WeComApiError, WeComConfigError
from wecom_bridge.jobs.kinds import (
    ChatJob,
    JobSpec,
    KfHandoverJob,
    KfPullJob,
    KfWelcomeJob,
    NoticeJob,
    ResetJob,
    new_job,
)
from wecom_bridge.jobs.processor import Answer, AppRuntime, Handler
from wecom_bridge.jobs.store import Arrival, Job, NewJob, Store
from wecom_bridge.wecom.kf_api import (
    PULL_TOKEN_SECONDS,
    KfClient,
    KfMessage,
    Origin,
    ServiceState,
)

log = logging.getLogger("wecom_bridge.kf")

INVALID_PULL_TOKEN = 95007
HISTORY_BEFORE = "kf_history_before"  # the job's result key of the first pull's boundary
ENTER_SESSION = "enter_session"


def route_customer(message: KfMessage, kf: KfConfig) -> list[JobSpec]:
    """The jobs for one customer message, in the order they run (none: nothing to answer)."""
    if message.msgtype != "text":
        reply = kf.replies.unsupported_reply
        if not reply:
            return []
        return [NoticeJob(text=reply, msg_id=message.msgid, msg_type=message.msgtype)]
    text = message.text.strip()
    if not text:
        return []
    if text in kf.replies.reset_words:
        return [ResetJob(msg_id=message.msgid)]
    if text in kf.handover_words:
        said = (
            [NoticeJob(text=kf.handover_reply, msg_id=message.msgid)] if kf.handover_reply else []
        )
        return [*said, KfHandoverJob(msg_id=message.msgid)]
    return [ChatJob(query=text, msg_id=message.msgid)]


@dataclass
class _Page:
    """What routing one pull's messages needs to remember from one message to the next."""

    states: dict[str, ServiceState] = field(default_factory=dict)
    handed_over: set[str] = field(default_factory=set)


class KfJobs:
    """The kf job kinds' handlers (added to the processor's table)."""

    def __init__(
        self,
        store: Store,
        kf: KfConfig,
        client: KfClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.kf = kf
        self.client = client
        self._clock = clock
        # Wakes idle workers for the jobs a pull stored (the pool's notify, set once it exists).
        self.wake: Callable[[int], None] = lambda jobs: None

    def handlers(self) -> dict[type[JobSpec], Handler]:
        return {
            KfPullJob: self.pull,
            KfHandoverJob: self.hand_over,
            KfWelcomeJob: self.welcome,
        }

    # --- the pull -----------------------------------------------------------------------------

    def pull(self, job: Job, spec: KfPullJob, app: AppRuntime) -> Answer:
        kfid = spec.open_kfid
        cursor = self.store.kf_cursor(self.kf.name, kfid)
        since = self._history_boundary(job, cursor)
        # Past its 10 minutes the token only earns an error: pull without it (rate-limited).
        token = spec.token if self._clock() - job.received_at < PULL_TOKEN_SECONDS else ""
        pages = stored = skipped = 0
        seen = _Page()
        while True:
            try:
                page = self.client.sync_msg(kfid, cursor or "", token)
            except WeComApiError as exc:
                if exc.errcode == INVALID_PULL_TOKEN and token:
                    token = ""
                    continue
                raise
            pages += 1
            fresh = [m for m in page.messages if since is None or m.send_time >= since]
            skipped += len(page.messages) - len(fresh)
            cursor = page.next_cursor or cursor or ""
            results = self.store.accept_pulled(
                self.kf.name, kfid, cursor, self._arrivals(fresh, seen)
            )
            new = sum(1 for result in results if result)
            stored += new
            if new:
                self.wake(new)
            if not page.has_more:
                break
        log.info(
            "kf messages pulled",
            extra={
                "job_id": job.id,
                "open_kfid": kfid,
                "event": "kf_pulled",
                "pages": pages,
                "jobs": stored,
                "skipped_history": skipped,
            },
        )
        return Answer("", {"pages": pages, "jobs": stored, "skipped_history": skipped})

    def _history_boundary(self, job: Job, cursor: str | None) -> float | None:
        """The send_time before which messages are history, not answered (None: answer all).

        Kept on the job: a first pull that dies after its first page resumes with a cursor,
        and its later pages are still the history it must skip."""
        noted = (job.result or {}).get(HISTORY_BEFORE)
        if isinstance(noted, int | float):
            return float(noted)
        if cursor is not None or self.kf.start != "now":
            return None
        since = job.received_at - PULL_TOKEN_SECONDS
        self.store.note_result(job.id, HISTORY_BEFORE, since)
        return since

    def _arrivals(self, messages: Sequence[KfMessage], page: _Page) -> list[Arrival]:
        arrivals: list[Arrival] = []
        for message in messages:
            arrivals += self._arrivals_of(message, page)
        return arrivals

    def _arrivals_of(self, message: KfMessage, page: _Page) -> list[Arrival]:
        key = f"kf:{message.msgid}"
        if not message.msgid or not message.external_userid:
            return []
        line = customer_line(message.open_kfid, message.external_userid)
        if message.origin == Origin.SYSTEM and message.event_type == ENTER_SESSION:
            return [Arrival(self.kf.name, key, self._welcome(line, message))]
        if message.origin != Origin.CUSTOMER:
            return []  # a servicer's reply or another event: nothing to answer
        if not self._bot_may_answer(message, page):
            return [Arrival(self.kf.name, key, None)]
        specs = route_customer(message, self.kf)
        if any(isinstance(spec, KfHandoverJob) for spec in specs):
            page.handed_over.add(message.external_userid)
        if not specs:
            return [Arrival(self.kf.name, key, None)]
        # One dedupe key per job: the first is the message's own, the others derive from it.
        keys = [key] + [f"{key}:{n}" for n in range(1, len(specs))]
        return [
            Arrival(self.kf.name, k, new_job(line, spec))
            for k, spec in zip(keys, specs, strict=True)
        ]

    def _welcome(self, line: str, message: KfMessage) -> NewJob | None:
        text = self.kf.replies.welcome_text
        if not text or not message.welcome_code:
            return None
        spec = KfWelcomeJob(welcome_code=message.welcome_code, text=text, msg_id=message.msgid)
        return new_job(line, spec)

    def _bot_may_answer(self, message: KfMessage, page: _Page) -> bool:
        user = message.external_userid
        if user in page.handed_over:
            return False  # asked for a human earlier in this pull
        if user not in page.states:
            page.states[user] = self._state(message.open_kfid, user)
        return page.states[user].bot_may_answer

    def _state(self, open_kfid: str, user: str) -> ServiceState:
        """The session's state; when WeCom refuses to tell (a permanent error), the bot answers
        and send_msg has the last word: a stuck pull would hold back the whole account."""
        try:
            return self.client.service_state(open_kfid, user)
        except WeComConfigError:
            raise
        except WeComApiError as exc:
            if exc.retryable:
                raise
            log.warning(
                "kf session state unknown; answering",
                extra={"open_kfid": open_kfid, "event": "kf_state_unknown", "errcode": exc.errcode},
            )
            return ServiceState.NEW

    # --- hand-over and welcome ------------------------------------------------------------------

    def hand_over(self, job: Job, spec: KfHandoverJob, app: AppRuntime) -> Answer:
        kfid, external = parse_customer_line(job.user)
        state = self.client.service_state(kfid, external)
        if not state.bot_may_answer:  # already with a human (or waiting for one), or ended
            return Answer("", {"service_state": int(state)})
        self.client.transfer(kfid, external, ServiceState.POOL)
        log.info(
            "kf session handed to the servicer pool",
            extra={"job_id": job.id, "user": job.user, "event": "kf_handover"},
        )
        return Answer("", {"service_state": int(ServiceState.POOL)})

    def welcome(self, job: Job, spec: KfWelcomeJob, app: AppRuntime) -> Answer:
        msgid = self.client.send_welcome(spec.welcome_code, spec.text)
        return Answer("", {"welcome_msgid": msgid})
