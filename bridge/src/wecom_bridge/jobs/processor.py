"""The job processor: one job from claimed to done, whatever its kind and channel.

A handler per job kind turns the job into text (Dify's answer, a reset confirmation, a notice,
a proactive message); the text is split to the channel's part limit and stored, then sent part
by part through the channel's outbound within the pacing limit. Progress is stored at each step
(the parts with the member's conversation, then each part sent, the last one with the finish),
so a worker killed anywhere leaves a job that resumes without asking Dify again and without
sending a part twice (unless it dies between WeCom accepting a part and that part's mark).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wecom_bridge.channels.base import (
    MediaOutbound,
    Outbound,
    Reply,
    StreamImageOutbound,
    StreamingOutbound,
    Target,
    TextProgress,
)
from wecom_bridge.config import AppConfig
from wecom_bridge.dify.client import DifyClient, DifyFile
from wecom_bridge.errors import (
    DifyError,
    DifyPausedError,
    JobDeferredError,
    JobPayloadError,
    MediaRefusedError,
    MediaTransientError,
    StoreUnavailableError,
    WeComApiError,
    WeComConfigError,
)
from wecom_bridge.jobs.kinds import (
    ChatJob,
    JobSpec,
    MediaJob,
    NoticeJob,
    ResetJob,
    SendJob,
    decode,
    target_of,
)
from wecom_bridge.jobs.media import KIND_WORDS, MediaStage
from wecom_bridge.jobs.media_out import (
    AnswerPlan,
    MediaSender,
    PartTransfer,
    plan_answer,
    stored_media,
    stored_stream_images,
    without_images,
)
from wecom_bridge.jobs.pacing import Pacer, SlidingWindowLimiter, send_paced
from wecom_bridge.jobs.splitter import cap_parts, split_message
from wecom_bridge.jobs.store import Conversation, Job, SentPart, Store
from wecom_bridge.metrics import Metrics
from wecom_bridge.wecom.messages import SendResult

log = logging.getLogger("wecom_bridge.processor")

MAX_JOB_RETRY_DELAY = 300.0
# A write that records what WeCom accepted (or what Dify answered) is retried until it lands,
# with this backoff: giving it up would send that part again (or ask Dify again).
RECORD_RETRY_FIRST = 0.05
RECORD_RETRY_MAX = 2.0
# The job's result key for the ids of the message Dify accepted (see DifyClient.ask).
DIFY_ACCEPTED = "dify_accepted"
# A media download or upload failing transiently is tried again this long after the message.
MEDIA_RETRY_SECONDS = 600.0
MEDIA_RETRY_MAX_DELAY = 60.0


@dataclass(frozen=True)
class AppRuntime:
    """One configured app: its settings, its Dify client and its channel's outbound."""

    config: AppConfig
    dify: DifyClient | None  # None: configuration loaded without Dify
    outbound: Outbound


@dataclass(frozen=True)
class Answer:
    """What a handler produced: the text to send and what to keep on the job."""

    text: str
    result: dict[str, object] = field(default_factory=dict)
    # Dify's answers: the files Dify attached, and whether its images and file links become
    # media parts (jobs/media_out.py).
    files: tuple[DifyFile, ...] = ()
    media: bool = False
    # A conversation Dify answered in that the member's next question must continue (empty:
    # no change); stored with the parts, in their commit.
    conversation_id: str = ""


# Each handler takes its own kind (the table is keyed by the kind's class, so it always does).
Handler = Callable[[Job, Any, AppRuntime], Answer]


def _member_inputs(config: AppConfig, spec: ChatJob) -> dict[str, str]:
    """Who asked, for a Dify app that declares an input for it (the AI bot in group chats)."""
    member = spec.context.get("member", "")
    name = config.aibot.member_input if config.aibot is not None else ""
    return {name: member} if name and member else {}


class JobProcessor:
    def __init__(
        self,
        store: Store,
        apps: dict[str, AppRuntime],
        metrics: Metrics,
        *,
        limiter: Pacer | None = None,
        send_max_age: float = 3600.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        channel_handlers: Mapping[type[JobSpec], Handler] | None = None,
        media_dir: Path | None = None,
        media: MediaStage | None = None,
    ) -> None:
        """`channel_handlers`: the handlers of a channel's own job kinds (e.g. 微信客服's pull).
        `media_dir`: where Dify's files wait between download and upload (None: every file
        of an answer is sent as its link). `media`: the stage that takes members' media to
        Dify (None: media jobs get the "failed" text)."""
        self.store = store
        self.apps = apps
        self.metrics = metrics
        self.limiter: Pacer = limiter or SlidingWindowLimiter()
        self.send_max_age = send_max_age
        self._sleep = sleep
        self._clock = clock
        # Parts WeCom accepted, by job id, kept in memory too: if the job is retried in this
        # process before its "sent" mark could be stored, those parts are not sent again.
        self._sent: dict[int, int] = {}
        self._sent_lock = threading.Lock()
        self._media_in = media
        self._handlers: dict[type[JobSpec], Handler] = {
            ChatJob: self._ask_dify,
            MediaJob: self._ask_with_media,
            ResetJob: self._reset,
            NoticeJob: self._notice,
            SendJob: self._proactive,
            **(channel_handlers or {}),
        }
        self._media_out = (
            MediaSender(media_dir, metrics=metrics, clock=clock) if media_dir is not None else None
        )

    def process(self, job: Job) -> None:
        fields: dict[str, object] = {
            "job_id": job.id,
            "user": job.user,
            "app": job.app,
            "kind": job.kind,
            "msg_id": job.payload.get("msg_id", ""),
        }
        app = self.apps.get(job.app)
        if app is None:
            self._fail(
                job, "no such app configured (was it removed from the config?)", None, fields
            )
            return
        try:
            spec = decode(job.kind, job.payload)
        except JobPayloadError as exc:
            # Stored by a release that wrote another shape: it would fail again, never retried.
            self._fail(job, str(exc), None, fields)
            return
        try:
            parts, result = self._parts(job, spec, app)
            last_part = self._send(job, spec, app, parts, result)
        except WeComApiError as exc:
            self._send_failed(job, exc, fields)
            return
        except JobDeferredError as exc:
            self.store.retry_later(job.id, exc.delay, exc.reason, None)
            log.info(
                "job deferred",
                extra={**fields, "event": "job_deferred", "reason": exc.reason, "delay": exc.delay},
            )
            return
        dify_error = result.get("dify_error")
        error = f"dify: {dify_error}" if dify_error else None
        if last_part is None:
            self.store.finish(job.id, error=error)
        else:  # the last part's mark rides on the finish, so it is written until it lands
            self._until_recorded(
                job,
                f"part {last_part.parts_sent} sent, job done",
                lambda: self.store.finish(job.id, error=error, last_part=last_part),
            )
        with self._sent_lock:
            self._sent.pop(job.id, None)
        if self._media_out is not None:
            self._media_out.cleanup(job.id)
        self.metrics.inc("wecom_bridge_jobs_total", {"status": "done"})
        done = "sent" if isinstance(spec, SendJob) else "answered"
        log.info(done, extra={**fields, "event": "job_done", "parts": len(parts)})

    # --- the text ----------------------------------------------------------------------------

    def _parts(
        self, job: Job, spec: JobSpec, app: AppRuntime
    ) -> tuple[list[str], dict[str, object]]:
        """The stored parts of a resumed job, or the handler's answer, split and stored."""
        if job.parts is not None:
            return job.parts, job.result or {}
        answer = self._handlers[type(spec)](job, spec, app)
        limit = app.outbound.part_limit_bytes
        result = answer.result
        if answer.media and app.config.dify is not None:
            sends_media = self._media_out is not None and app.config.media.enabled
            inline = not sends_media or not isinstance(app.outbound, MediaOutbound)
            outbound = app.outbound
            on_stream = sends_media and isinstance(outbound, StreamImageOutbound)
            most = outbound.max_stream_images if isinstance(outbound, StreamImageOutbound) else 0
            plan = plan_answer(
                answer.text,
                answer.files,
                app.config.dify,
                app.config.media,
                limit,
                inline=inline,
                stream_images=most if on_stream else 0,
            )
            parts = self._capped(job, plan.parts, app)
            # Media parts a cap cut off (or turned into the notice) are not media any more.
            kept = {i: ref for i, ref in plan.media.items() if i < len(parts)}
            if len(parts) < len(plan.parts):
                kept.pop(len(parts) - 1, None)
            images = plan.images if parts else ()
            result = {**answer.result, **AnswerPlan(parts, kept, images).result()}
        else:
            parts = self._split(job, answer.text, app)
        cfg = app.config
        conversation = (
            Conversation(cfg.corp_id, cfg.agent_id, job.user, answer.conversation_id)
            if answer.conversation_id
            else None
        )
        self._until_recorded(
            job,
            "answer",
            lambda: self.store.save_parts(job.id, parts, result, conversation=conversation),
        )
        return parts, result

    def _split(self, job: Job, text: str, app: AppRuntime) -> list[str]:
        limit = app.outbound.part_limit_bytes
        return self._capped(job, split_message(text, limit) if text else [], app)

    def _capped(self, job: Job, parts: list[str], app: AppRuntime) -> list[str]:
        limit, max_parts = app.outbound.part_limit_bytes, app.outbound.max_parts
        capped = cap_parts(parts, max_parts, limit, app.config.replies.truncated_notice)
        if len(capped) < len(parts):
            log.warning(
                "answer cut to the channel's limit of parts per message",
                extra={
                    "job_id": job.id,
                    "event": "answer_truncated",
                    "parts": len(parts),
                    "max_parts": max_parts,
                    "app": app.config.name,
                },
            )
        return capped

    def _until_recorded(self, job: Job, what: str, write: Callable[[], None]) -> None:
        """Run a progress write until it lands. Dify's answer and the parts WeCom accepted
        exist only here until they are stored: a write given up would ask Dify again or send
        a part twice, so a busy or unavailable store is waited out (with backoff)."""
        delay, attempt = RECORD_RETRY_FIRST, 0
        while True:
            try:
                write()
            except StoreUnavailableError as exc:
                attempt += 1
                if attempt == 1 or attempt % 30 == 0:
                    log.error(
                        "could not record progress; retrying until it is recorded",
                        extra={
                            "job_id": job.id,
                            "event": "record_retry",
                            "what": what,
                            "attempt": attempt,
                            "error": str(exc),
                        },
                    )
                self._sleep(delay)
                delay = min(RECORD_RETRY_MAX, delay * 2)
                continue
            if attempt:
                log.info(
                    "progress recorded after retries",
                    extra={"job_id": job.id, "what": what, "attempts": attempt + 1},
                )
            return

    def _reset(self, job: Job, spec: ResetJob, app: AppRuntime) -> Answer:
        cfg = app.config
        self.store.forget_conversation(cfg.corp_id, cfg.agent_id, job.user)
        return Answer(cfg.replies.reset_reply)

    def _notice(self, job: Job, spec: NoticeJob, app: AppRuntime) -> Answer:
        return Answer(spec.text)

    def _proactive(self, job: Job, spec: SendJob, app: AppRuntime) -> Answer:
        return Answer(spec.request.content)

    def _ask_with_media(self, job: Job, spec: MediaJob, app: AppRuntime) -> Answer:
        """The media stage (jobs/media.py), then Dify asked with the uploaded files."""
        replies = app.config.replies
        kind = spec.media[0].kind
        try:
            if self._media_in is None or app.dify is None:
                raise MediaRefusedError("failed", "media handling is not configured")
            # The AI bot's caption comes in the same (mixed) message, and a text absorbed
            # into another answer would leave its own stream open: no window there.
            streams = isinstance(app.outbound, StreamingOutbound)
            window = 0.0 if streams else app.config.media.caption_seconds
            prepared = self._media_in.prepare(
                job, spec, app.config, app.dify, self._until_recorded, caption_seconds=window
            )
        except MediaRefusedError as exc:
            return self._media_refused(job, kind, exc, replies.media_reply)
        except MediaTransientError as exc:
            if self._clock() - job.received_at < MEDIA_RETRY_SECONDS:
                delay = min(MEDIA_RETRY_MAX_DELAY, 5.0 * 2 ** max(0, job.attempts - 1))
                raise JobDeferredError(delay, f"media: {exc}") from None
            refused = MediaRefusedError(
                "failed", f"gave up after {MEDIA_RETRY_SECONDS:.0f}s: {exc}"
            )
            return self._media_refused(job, kind, refused, replies.media_reply)
        self.metrics.inc("wecom_bridge_media_in_total", {"kind": kind})
        question = ChatJob(query=prepared.query, msg_id=spec.msg_id, context=spec.context)
        answer = self._ask_dify(job, question, app, files=prepared.files)
        if prepared.echo:
            return Answer(
                f"{prepared.echo}\n\n{answer.text}",
                answer.result,
                conversation_id=answer.conversation_id,
            )
        return answer

    def _media_refused(
        self, job: Job, kind: str, exc: MediaRefusedError, text: Callable[..., str]
    ) -> Answer:
        log.warning(
            "media refused, telling the member",
            extra={
                "job_id": job.id,
                "user": job.user,
                "event": "media_refused",
                "reason": exc.reason,
                "error": exc.detail,
            },
        )
        self.metrics.inc("wecom_bridge_media_refused_total", {"reason": exc.reason})
        values = {"kind": KIND_WORDS.get(kind, ""), **exc.values}
        return Answer(text(exc.reason, **values), {"media_refused": exc.reason})

    def _ask_dify(
        self,
        job: Job,
        spec: ChatJob,
        app: AppRuntime,
        files: list[dict[str, str]] | None = None,
    ) -> Answer:
        cfg = app.config
        fallback = cfg.replies.fallback_reply
        if app.dify is None:  # only a configuration loaded without Dify has none
            return Answer(fallback, {"dify_error": "not configured"})
        conversation = self.store.get_conversation(cfg.corp_id, cfg.agent_id, job.user)
        accepted = (job.result or {}).get(DIFY_ACCEPTED)
        try:
            with self._streaming(app, spec, job.user) as on_text:
                if isinstance(accepted, dict):  # asked before a crash: fetch, do not ask again
                    log.info(
                        "resuming: fetching the answer Dify accepted before",
                        extra={"job_id": job.id, "user": job.user, "event": "dify_resume"},
                    )
                    answer = app.dify.resume(accepted, spec.query, job.user)
                else:
                    answer = app.dify.ask(
                        spec.query,
                        job.user,
                        conversation,
                        on_accepted=lambda ids: self._note_accepted(job, ids),
                        # The stream shows the text; its images come as images afterwards.
                        on_text=(lambda text: on_text(without_images(text))) if on_text else None,
                        member_inputs=_member_inputs(app.config, spec),
                        files=files or (),
                    )
        except DifyPausedError as exc:
            fields: dict[str, object] = {"event": "dify_paused", "workflow_run_id": exc.run_id}
            log.warning(
                "Dify workflow paused for human input, telling the member",
                extra={"job_id": job.id, "user": job.user, **fields},
            )
            return Answer(cfg.replies.paused_reply, {"dify_paused": exc.run_id})
        except DifyError as exc:
            fields = {"event": "dify_failed", "code": exc.code, "status": exc.status}
            log.warning(
                "Dify failed, sending the fallback text",
                extra={"job_id": job.id, "user": job.user, **fields, "error": str(exc)},
            )
            return Answer(fallback, {"dify_error": exc.code or str(exc.status or "unreachable")})
        changed = answer.conversation_id if answer.conversation_id != conversation else ""
        result: dict[str, object] = {
            "conversation_id": answer.conversation_id,
            "message_id": answer.message_id,
        }
        text = answer.text.strip() or ("" if answer.files else fallback)
        return Answer(text, result, answer.files, media=True, conversation_id=changed)

    @staticmethod
    @contextlib.contextmanager
    def _streaming(app: AppRuntime, spec: ChatJob, user: str) -> Iterator[TextProgress | None]:
        """The channel's progress callback while Dify writes (None: it does not stream)."""
        if not isinstance(app.outbound, StreamingOutbound):
            yield None
            return
        with app.outbound.streaming(target_of(spec, user)) as on_text:
            yield on_text

    def _note_accepted(self, job: Job, ids: dict[str, str]) -> None:
        """Keep the ids of the message Dify accepted, so that a job resumed after a crash
        fetches its answer instead of asking again (best effort: without them it asks again)."""
        try:
            self.store.note_result(job.id, DIFY_ACCEPTED, ids)
        except StoreUnavailableError as exc:
            log.warning(
                "could not keep the Dify message ids",
                extra={"job_id": job.id, "event": "dify_ids_unsaved", "error": str(exc)},
            )

    # --- sending ----------------------------------------------------------------------------

    def _send(
        self,
        job: Job,
        spec: JobSpec,
        app: AppRuntime,
        parts: list[str],
        result: Mapping[str, object],
    ) -> SentPart | None:
        """Send the parts not sent yet; each one WeCom accepted is recorded at once, except the
        last, which is returned for the job's finish to record."""
        last: list[SentPart] = []

        def sent(index: int, result: SendResult) -> None:
            invalid = {
                "invaliduser": result.invaliduser,
                "invalidparty": result.invalidparty,
                "invalidtag": result.invalidtag,
                "unlicenseduser": result.unlicenseduser,
            }
            with self._sent_lock:
                self._sent[job.id] = max(self._sent.get(job.id, 0), index + 1)
            part = SentPart(index + 1, result.msgid, invalid)
            if index + 1 == len(parts):
                last.append(part)
                return
            self._until_recorded(
                job, f"part {index + 1} sent", lambda: self.store.mark_part_sent(job.id, part)
            )

        with self._sent_lock:
            start = max(job.parts_sent, self._sent.get(job.id, 0))
        send_paced(
            app.outbound,
            self.limiter,
            target_of(spec, job.user),
            parts,
            on_sent=sent,
            start=start,
            sleep=self._sleep,
            send=self._media_parts(job, app, result),
        )
        return last[0] if last else None

    def _media_parts(
        self, job: Job, app: AppRuntime, result: Mapping[str, object]
    ) -> Callable[[int, Target, str], SendResult] | None:
        """How the answer's parts go out when some of them are media (None: all are text)."""
        media, refs, images = self._media_out, stored_media(result), stored_stream_images(result)
        if media is None or not (refs or images):
            return None
        transfer = PartTransfer(
            job_id=job.id,
            result=result,
            note=lambda key, value: self.store.note_result(job.id, key, value),
            record=lambda what, write: self._until_recorded(job, what, write),
        )
        settings = (app.config.dify, app.config.media)

        def send(index: int, target: Target, text: str) -> SendResult:
            if index == 0 and images and isinstance(app.outbound, StreamImageOutbound):
                return media.finish_stream(transfer, images, target, app.outbound, settings, text)
            ref = refs.get(index)
            if ref is None:
                return app.outbound.send_part(target, text)
            return media.send(transfer, index, ref, target, app.outbound, settings, text)

        return send

    def _send_failed(self, job: Job, exc: WeComApiError, fields: dict[str, object]) -> None:
        age = self._clock() - job.received_at
        if (exc.retryable or isinstance(exc, WeComConfigError)) and age < self.send_max_age:
            delay = min(MAX_JOB_RETRY_DELAY, 5.0 * 2 ** (job.attempts - 1))
            # A frequency limit (45009) blocks for a window: no retry before it can be over.
            delay = max(delay, exc.retry_after)
            self.store.retry_later(job.id, delay, str(exc), exc.errcode)
            log.warning(
                "send failed, will retry",
                extra={**fields, "event": "send_retry", "errcode": exc.errcode, "delay": delay},
            )
            return
        self._fail(job, str(exc), exc.errcode, fields)

    def give_up(self, job: Job, error: str) -> None:
        """Fail a job that keeps failing unexpectedly; the member hears the fallback text (best
        effort: whatever broke the job may break this too) instead of silence."""
        app = self.apps.get(job.app)
        if app is not None and job.kind != SendJob.KIND:
            try:
                app.outbound.send_part(self._reply_to(job), app.config.replies.fallback_reply)
            except Exception:
                log.exception("could not send the fallback text", extra={"job_id": job.id})
        fields: dict[str, object] = {"job_id": job.id, "user": job.user, "app": job.app}
        self._fail(job, f"given up after repeated errors ({error})", None, fields)

    @staticmethod
    def _reply_to(job: Job) -> Target:
        """The job's member, with the channel's handle on their message when it can be read."""
        try:
            return target_of(decode(job.kind, job.payload), job.user)
        except JobPayloadError:
            return Reply(job.user)

    def _fail(self, job: Job, error: str, errcode: int | None, fields: dict[str, object]) -> None:
        self.store.fail(job.id, error, errcode)
        with self._sent_lock:
            self._sent.pop(job.id, None)
        self.metrics.inc("wecom_bridge_jobs_total", {"status": "failed"})
        log.error(
            "job failed",
            extra={**fields, "event": "job_failed", "errcode": errcode, "error": error},
        )
