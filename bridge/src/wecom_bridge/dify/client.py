"""Client for Dify's Service API: one question in, one answer text out.

Every mode streams (SSE: Dify pings every ~10 s, so a per-read timeout catches a stalled Dify
without cutting long answers or long workflow runs): chat, Chatflow and Agent apps through
/chat-messages, completion apps through /completion-messages, workflow apps through
/workflows/run (`text_chunk` events, then `workflow_finished` with the outputs).

Dify is asked once per message. Dify records the message (and a new conversation) before the
model runs, so once a request was accepted (the 200 stream began) it is never POSTed again: if
the stream then breaks, the answer is fetched afterwards (`GET /messages` for the conversation,
`GET /workflows/run/<id>` for a workflow), polled with backoff for `recover_seconds`. Re-POSTing
is only for failures before Dify accepted (connect errors, 429, 5xx) and for the in-stream
`completion_request_error` (a provider's rate limit, 5xx or connection: the first message failed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import ReadTimeoutError

from wecom_bridge.errors import ConversationNotFoundError, DifyError, DifyPausedError
from wecom_bridge.http_session import session_for
from wecom_bridge.metrics import Metrics

log = logging.getLogger("wecom_bridge.dify")
_T = TypeVar("_T")

# Dify's app modes, as /v1/info reports them; the first three answer through /chat-messages.
APP_MODES = ("chat", "advanced-chat", "agent-chat", "completion", "workflow")
CHAT_MODES = frozenset(APP_MODES[:3])
# Workflow outputs tried in this order when none is configured.
WORKFLOW_OUTPUT_NAMES = ("answer", "text", "result", "output")
# Finished workflow statuses whose outputs are valid (partial-succeeded: a node's error strategy
# handled an error).
WORKFLOW_OK = ("succeeded", "partial-succeeded")
# The one in-stream error code Dify uses for provider failures (rate limit, 5xx, connection).
TRANSIENT_STREAM_CODE = "completion_request_error"
RECOVER_STEP_MAX = 15.0
# How long the app's input form (GET /parameters) is trusted before it is read again.
PARAMETERS_TTL = 300.0
# Jobs of one Dify app running at once: what protects Dify from the bridge's whole pool.
DEFAULT_MAX_CONCURRENCY = 64

# Reasoning models' thinking: <think>…</think> (an unclosed one runs to the end), and the
# <details><summary>Thinking...</summary>…</details> block some Dify releases render it as.
_THINK_RE = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
_DETAILS_RE = re.compile(
    r"<details[^>]*>\s*<summary>\s*Thinking\.\.\.\s*</summary>.*?</details>", re.DOTALL
)


def strip_reasoning(text: str) -> str:
    """`text` without a reasoning model's thinking."""
    return _DETAILS_RE.sub("", _THINK_RE.sub("", text)).strip()


@dataclass(frozen=True)
class DifySettings:
    api_base: str  # e.g. http://127.0.0.1:8080/v1 (with /v1)
    api_key: str
    app_mode: str | None = None  # None: ask GET /info once
    workflow_output: str | None = None  # None: answer/text/result/output or the only string output
    connect_timeout: float = 5.0
    read_timeout: float = 120.0  # per socket read; SSE pings every ~10 s keep it alive
    max_attempts: int = 3
    backoff_base: float = 1.0
    query_input: str = "query"  # input variable that carries the question (completion, workflow)
    inputs: Mapping[str, object] = field(default_factory=dict)  # static inputs, every message
    recover_seconds: float = 120.0  # how long a broken stream's answer is looked for
    strip_reasoning: bool = True  # remove <think>…</think> from what members receive
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY  # this app's jobs running at once, at most
    # Where Dify's relative file links (/files/…) point: Dify's FILES_URL ("" = the origin of
    # api_base, which is where Dify's nginx serves /files too).
    files_url: str = ""

    @property
    def files_base(self) -> str:
        """The origin relative file links are resolved against (no trailing slash)."""
        if self.files_url:
            return self.files_url.rstrip("/")
        parts = urlsplit(self.api_base)
        return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class DifyFile:
    """A file Dify attached to its answer (a `message_file` event, or `message_files` of
    GET /messages): a tool's image or document. `url` may be relative (/files/…)."""

    id: str
    type: str  # image | document | audio | video | custom
    url: str
    belongs_to: str = "assistant"
    filename: str = ""  # workflow file outputs name their file

    def payload(self) -> dict[str, str]:
        return {"id": self.id, "type": self.type, "url": self.url, "belongs_to": self.belongs_to}


FILE_MODEL_IDENTITY = "__dify__file__"  # how Dify marks a serialised File (File.to_dict)


def _file_values(value: object) -> list[Mapping[str, Any]]:
    """The File objects a workflow output holds (one, or a list of them), else []."""
    items: list[object] = list(value) if isinstance(value, list) else [value]
    found: list[Mapping[str, Any]] = [i for i in items if isinstance(i, dict)]
    is_files = bool(found) and len(found) == len(items)
    is_files = is_files and all(i.get("dify_model_identity") == FILE_MODEL_IDENTITY for i in found)
    return found if is_files else []


def output_files(outputs: Mapping[str, Any]) -> tuple[DifyFile, ...]:
    """A workflow's file outputs (File.to_dict: type, filename, url signed as for messages)."""
    files = []
    for value in outputs.values():
        for item in _file_values(value):
            url = str(item.get("url") or item.get("remote_url") or "")
            if url:
                file_id = str(item.get("related_id") or item.get("id") or "")
                kind = str(item.get("type") or "custom")
                files.append(DifyFile(file_id, kind, url, filename=str(item.get("filename") or "")))
    return tuple(files)


def dify_file(data: Mapping[str, Any]) -> DifyFile | None:
    """One file of an event or a stored message; None without a URL or when it is the user's."""
    url = str(data.get("url") or data.get("remote_url") or "")
    belongs_to = str(data.get("belongs_to") or "assistant")
    if not url or belongs_to != "assistant":
        return None
    kind = str(data.get("type") or "").lower() or "custom"
    return DifyFile(id=str(data.get("id") or ""), type=kind, url=url, belongs_to=belongs_to)


@dataclass(frozen=True)
class DifyAnswer:
    text: str
    conversation_id: str = ""
    message_id: str = ""
    files: tuple[DifyFile, ...] = ()  # message_file events, in the order Dify sent them


@dataclass
class _Progress:
    """What one accepted request has told so far (the ids that let its answer be fetched)."""

    conversation_id: str = ""
    message_id: str = ""
    workflow_run_id: str = ""
    answer: str = ""
    files: list[DifyFile] = field(default_factory=list)


class _StreamBroken(DifyError):
    """An accepted stream broke: the answer is fetched, the question is not POSTed again."""

    def __init__(self, path: str, reason: str, progress: _Progress) -> None:
        super().__init__(f"Dify {path} stream broke: {reason}", code=reason, retryable=False)
        self.progress = progress


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def _http_error(response: requests.Response) -> DifyError:
    """Dify's {"code","message","status"} error body as a DifyError."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    status = response.status_code
    code = str(body.get("code") or f"http_{status}")
    message = str(body.get("message") or response.reason or "Dify error")
    if status == 404 and "conversation" in message.lower():
        return ConversationNotFoundError(message, status=status, code=code)
    if status == 400 and code == "invalid_param" and "conversation_id" in message:
        # e.g. "conversation_id: x is not a valid uuid." — the stored id is unusable
        return ConversationNotFoundError(message, status=status, code=code)
    return DifyError(message, status=status, code=code, retryable=_retryable_status(status))


def _stream_error(event: Mapping[str, Any]) -> DifyError:
    """An `error` event, classified as Dify emits them: only completion_request_error (every
    provider failure) is worth another attempt; internal_server_error and the rest are not."""
    code = str(event.get("code") or "stream_error")
    try:
        status = int(event.get("status") or 500)
    except (TypeError, ValueError):
        status = 500
    return DifyError(
        str(event.get("message") or "Dify stream error"),
        status=status,
        code=code,
        retryable=code == TRANSIENT_STREAM_CODE,
    )


def _sse_events(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The JSON objects of a text/event-stream body (`data:` lines; a blank line ends an event)."""
    name, data = "", []
    for raw in response.iter_lines(chunk_size=None):
        line = raw.decode("utf-8")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif not line:
            if data:
                yield _decode_event(name, data)
            name, data = "", []
        # ":" comments, id: and retry: fields carry nothing we need
    if data:
        yield _decode_event(name, data)


def _decode_event(name: str, data: list[str]) -> dict[str, Any]:
    event = json.loads("\n".join(data))
    if not isinstance(event, dict):
        raise ValueError("event data is not a JSON object")
    event.setdefault("event", name or "message")
    return event


@dataclass
class _Call:
    """One member message being asked: how many times its question was POSTed, and who
    wants to know the ids of the message Dify accepted (to fetch its answer after a crash)."""

    posts: int = 0
    on_accepted: Callable[[dict[str, str]], None] | None = None
    reported: tuple[str, str] = ("", "")
    # Called with the whole answer so far as it streams (already cleaned of reasoning).
    on_text: Callable[[str], None] | None = None
    clean: Callable[[str], str] = str
    extra: dict[str, object] = field(default_factory=dict)  # per-message inputs
    files: list[Mapping[str, str]] = field(default_factory=list)  # chat-messages `files`

    def grew(self, text: str) -> None:
        if self.on_text is not None:
            self.on_text(self.clean(text))

    def accepted(self, progress: _Progress) -> None:
        ids = (progress.message_id, progress.workflow_run_id)
        if self.on_accepted is None or not any(ids) or ids == self.reported:
            return
        self.reported = ids
        self.on_accepted(
            {
                "conversation_id": progress.conversation_id,
                "message_id": progress.message_id,
                "workflow_run_id": progress.workflow_run_id,
            }
        )


class DifyClient:
    def __init__(
        self,
        settings: DifySettings,
        *,
        metrics: Metrics | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        self._base = settings.api_base.rstrip("/")
        self._metrics = metrics or Metrics()
        # The dispatcher runs at most max_concurrency of this app's jobs at once.
        self._session = session or session_for(self._base, connections=settings.max_concurrency)
        self._sleep = sleep
        self._timeout = (settings.connect_timeout, settings.read_timeout)
        self._mode: str | None = settings.app_mode
        self._mode_lock = threading.Lock()
        self._form: list[dict[str, Any]] | None = None
        self._form_read_at = 0.0
        self._features: dict[str, Any] | None = None
        self._features_read_at = 0.0
        self._clock = time.monotonic
        self._jitter = random.Random()  # noqa: S311 - backoff jitter, not security

    # --- public ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """GET /info: name, description, tags, mode, author_name (also validates the key)."""
        info: dict[str, Any] = self._with_retries(lambda: self._json(self._send("GET", "/info")))
        return info

    def app_mode(self) -> str:
        """The configured app mode, else the one /info reports (asked once)."""
        with self._mode_lock:
            if self._mode is None:
                self._mode = str(self.info().get("mode", ""))
                log.info("Dify app mode: %s", self._mode)
            mode = self._mode
        if mode not in APP_MODES:
            raise DifyError(f"unsupported Dify app mode {mode!r}", code="unsupported_app_mode")
        return mode

    def parameters(self) -> dict[str, Any]:
        """GET /parameters: the app's user_input_form, opening statement, file upload, …"""
        return self._json(self._send("GET", "/parameters"))  # one try: it only informs

    def input_form(self, *, refresh: bool = False) -> list[dict[str, Any]]:
        """The variables the app declares ({"variable", "required", "label", …} each), read
        from /parameters at most every PARAMETERS_TTL seconds (or at once with `refresh`)."""
        with self._mode_lock:
            fresh = self._form is not None and self._clock() - self._form_read_at < PARAMETERS_TTL
            if fresh and not refresh and self._form is not None:
                return self._form
        form = self.parameters().get("user_input_form") or []
        variables = [
            spec
            for item in form
            if isinstance(item, dict)
            for spec in item.values()
            if isinstance(spec, dict) and spec.get("variable")
        ]
        with self._mode_lock:
            self._form, self._form_read_at = variables, self._clock()
        return variables

    def input_problems(self, *, refresh: bool = False) -> tuple[list[str], list[str]]:
        """What the configured inputs lack for this app (problems: Dify would refuse every
        message) and what it ignores (warnings: Dify drops undeclared inputs silently)."""
        mode = self.app_mode()
        declared = {str(spec["variable"]): spec for spec in self.input_form(refresh=refresh)}
        given = {k for k, v in self._settings.inputs.items() if v not in (None, "")}
        takes_query = mode not in CHAT_MODES
        if takes_query:
            given.add(self._settings.query_input)
        problems = [
            f"the app requires the input {name!r} ({spec.get('label') or name}): "
            "set it in DIFY_INPUTS" + ("" if not takes_query else " or name it in DIFY_QUERY_INPUT")
            for name, spec in declared.items()
            if spec.get("required") and name not in given
        ]
        if takes_query and self._settings.query_input not in declared:
            problems.append(
                f"DIFY_QUERY_INPUT={self._settings.query_input} is not an input of the app, so "
                f"Dify would drop the question (inputs: {', '.join(sorted(declared)) or 'none'})"
            )
        warnings = [
            f"DIFY_INPUTS key {name!r} is not an input of the app (Dify drops it)"
            for name in sorted(self._settings.inputs)
            if name not in declared
        ]
        return problems, warnings

    def _check_inputs(self) -> None:
        """Refuse to ask when the app needs an input nobody configured: Dify would answer 400
        on every message. The form is cached; if /parameters cannot be read, ask anyway."""
        try:
            problems, _ = self.input_problems()
        except DifyError as exc:
            log.warning("could not read the app's input form (%s); asking anyway", exc.code)
            return
        if problems:
            raise DifyError("; ".join(problems), code="input_missing")

    def ask(
        self,
        query: str,
        user: str,
        conversation_id: str = "",
        *,
        on_accepted: Callable[[dict[str, str]], None] | None = None,
        on_text: Callable[[str], None] | None = None,
        member_inputs: Mapping[str, str] | None = None,
        files: Sequence[Mapping[str, str]] = (),
    ) -> DifyAnswer:
        """Dify's answer to `query` (with `files`: uploaded files, see `upload_file`).
        `on_accepted(ids)` is called as soon as Dify named the message it accepted
        (conversation_id, message_id, workflow_run_id): keep them, and a job resumed after
        a crash fetches that answer (`resume`) instead of asking again.
        `on_text(answer_so_far)` follows the stream. `member_inputs` (e.g. who asked) are
        added to the inputs the app declares; the others are left out."""
        started = time.monotonic()
        clean = strip_reasoning if self._settings.strip_reasoning else str
        call = _Call(on_accepted=on_accepted, on_text=on_text, clean=clean, files=list(files))
        try:
            mode = self.app_mode()
            self._check_inputs()
            call.extra = self._declared(member_inputs or {})
            try:
                if mode in CHAT_MODES:
                    answer = self._chat(call, query, user, conversation_id)
                elif mode == "completion":
                    body = self._body(user, inputs=self._inputs(query, call.extra))
                    answer = self._with_retries(
                        lambda: self._stream(call, "/completion-messages", body)
                    )
                else:
                    body = self._body(user, inputs=self._inputs(query, call.extra))
                    answer = self._with_retries(lambda: self._stream(call, "/workflows/run", body))
            except _StreamBroken as broken:
                answer = self._recover(broken, query, user)
            return self._cleaned(answer)
        except DifyError as exc:
            if exc.code == "invalid_param" and "required in input form" in str(exc):
                with contextlib.suppress(DifyError):  # the app's form changed since it was read
                    self.input_form(refresh=True)
            self._metrics.inc("wecom_bridge_dify_errors_total", {"code": exc.code or "unknown"})
            raise
        finally:
            self._metrics.observe("wecom_bridge_dify_latency_seconds", time.monotonic() - started)
            if call.posts:
                self._metrics.observe("wecom_bridge_dify_requests_per_message", call.posts)

    def resume(self, accepted: Mapping[str, object], query: str, user: str) -> DifyAnswer:
        """The answer to a question Dify accepted earlier (the ids `ask` reported), fetched
        from Dify; the question is not POSTed again."""
        started = time.monotonic()
        progress = _Progress(
            conversation_id=str(accepted.get("conversation_id") or ""),
            message_id=str(accepted.get("message_id") or ""),
            workflow_run_id=str(accepted.get("workflow_run_id") or ""),
        )
        try:
            return self._cleaned(
                self._recover(_StreamBroken("earlier", "resumed", progress), query, user)
            )
        except DifyError as exc:
            self._metrics.inc("wecom_bridge_dify_errors_total", {"code": exc.code or "unknown"})
            raise
        finally:
            self._metrics.observe("wecom_bridge_dify_latency_seconds", time.monotonic() - started)

    def _cleaned(self, answer: DifyAnswer) -> DifyAnswer:
        if not self._settings.strip_reasoning:
            return answer
        return DifyAnswer(
            strip_reasoning(answer.text), answer.conversation_id, answer.message_id, answer.files
        )

    # --- files and voice (a member's media) -----------------------------------------------

    def app_features(self, *, refresh: bool = False) -> dict[str, Any]:
        """/parameters as the media stage reads it (`file_upload`, `speech_to_text`,
        `system_parameters`), cached for PARAMETERS_TTL like the input form."""
        with self._mode_lock:
            cached = self._features
            fresh = cached is not None and self._clock() - self._features_read_at < PARAMETERS_TTL
            if fresh and not refresh and cached is not None:
                return cached
        features = self._with_retries(self.parameters)
        with self._mode_lock:
            self._features, self._features_read_at = features, self._clock()
        return features

    def upload_file(
        self, user: str, name: str, content: IO[bytes], mime_type: str
    ) -> dict[str, Any]:
        """POST /files/upload (multipart `file`, `user`) → 201 {"id", "name", "size",
        "extension", "mime_type", …}: reference it as local_file with upload_file_id. Errors
        as Dify emits them: 413 file_too_large, 415 unsupported_file_type, 400 …"""
        response = self._multipart("/files/upload", user, name, content, mime_type)
        return self._json(response)

    def audio_to_text(self, user: str, name: str, content: IO[bytes], mime_type: str) -> str:
        """POST /audio-to-text → {"text"}. Dify takes audio/<mp3|mp4|mpeg|mpga|m4a|wav|webm|
        amr> up to 30 MB, and only when the app has speech to text enabled."""
        data = self._json(self._multipart("/audio-to-text", user, name, content, mime_type))
        return str(data.get("text") or "")

    def _multipart(
        self, path: str, user: str, name: str, content: IO[bytes], mime_type: str
    ) -> requests.Response:
        """One multipart POST, not retried here: the caller's job retries it later."""
        form = {"files": {"file": (name, content, mime_type)}, "data": {"user": user}}
        return self._send("POST", path, form=form)

    # --- modes -----------------------------------------------------------------------------

    def _body(self, user: str, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "inputs": dict(self._settings.inputs),
            "user": user,
            "response_mode": "streaming",
        }
        body.update(fields)
        return body

    def _inputs(self, query: str, extra: Mapping[str, object]) -> dict[str, object]:
        return {**self._settings.inputs, **extra, self._settings.query_input: query}

    def _declared(self, wanted: Mapping[str, str]) -> dict[str, object]:
        """The per-message inputs the app declares (Dify drops others, and a form that could
        not be read sends none: better no input than a refused message)."""
        if not wanted:
            return {}
        try:
            declared = {str(spec["variable"]) for spec in self.input_form()}
        except DifyError:
            return {}
        return {name: value for name, value in wanted.items() if name in declared}

    def _chat(self, call: _Call, query: str, user: str, conversation_id: str) -> DifyAnswer:
        inputs = {**self._settings.inputs, **call.extra}
        body = self._body(user, query=query, conversation_id=conversation_id, inputs=inputs)
        if call.files:
            body["files"] = [dict(f) for f in call.files]
        try:
            return self._with_retries(lambda: self._stream(call, "/chat-messages", body))
        except ConversationNotFoundError as exc:
            if not conversation_id:
                raise
            log.info(
                "Dify refused conversation %s (%s); starting a new one", conversation_id, exc.code
            )
        fresh = {**body, "conversation_id": ""}
        return self._with_retries(lambda: self._stream(call, "/chat-messages", fresh))

    def _workflow_result(self, data: Mapping[str, Any], run_id: str) -> DifyAnswer:
        """A finished run (workflow_finished's data, or GET /workflows/run/<id>) as an answer."""
        status = str(data.get("status") or "")
        if status in WORKFLOW_OK:
            raw = data.get("outputs") or {}
            outputs = raw if isinstance(raw, dict) else {}
            files = output_files(outputs)
            text_outputs = {k: v for k, v in outputs.items() if not _file_values(v)}
            if files and not text_outputs and self._settings.workflow_output is None:
                return DifyAnswer(text="", message_id=run_id, files=files)  # files only
            text = self._pick_output(text_outputs if files else outputs)
            return DifyAnswer(text=text, message_id=run_id, files=files)
        if status == "paused":
            raise DifyPausedError(run_id, data.get("reasons"))
        raise DifyError(
            f"workflow {status}: {data.get('error') or 'no error text'}",
            code=f"workflow_{status or 'unknown'}",
            retryable=False,
        )

    def _pick_output(self, outputs: dict[str, Any]) -> str:
        wanted = self._settings.workflow_output
        if wanted is not None:
            if wanted not in outputs:
                raise DifyError(
                    f"workflow has no output {wanted!r} (outputs: {sorted(outputs)})",
                    code="workflow_output_missing",
                )
            value = outputs[wanted]
        else:
            names = [n for n in WORKFLOW_OUTPUT_NAMES if n in outputs]
            strings = [n for n, v in outputs.items() if isinstance(v, str)]
            if names:
                value = outputs[names[0]]
            elif len(strings) == 1:
                value = outputs[strings[0]]
            else:
                raise DifyError(
                    f"cannot tell which workflow output to send (outputs: {sorted(outputs)}); "
                    "configure the output name",
                    code="workflow_output_ambiguous",
                )
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    # --- transport -------------------------------------------------------------------------

    def _with_retries(self, attempt_fn: Callable[[], _T]) -> _T:
        attempts = max(1, self._settings.max_attempts)
        for attempt in range(1, attempts + 1):
            try:
                return attempt_fn()
            except DifyError as exc:
                if not exc.retryable or attempt == attempts:
                    raise
                delay = self._settings.backoff_base * 2 ** (attempt - 1)
                delay *= self._jitter.uniform(1.0, 1.5)
                log.warning(
                    "Dify error %s (%s), attempt %d/%d, retrying in %.1fs",
                    exc.code,
                    exc,
                    attempt,
                    attempts,
                    delay,
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        stream: bool = False,
        params: dict[str, str] | None = None,
        form: dict[str, Any] | None = None,
    ) -> requests.Response:
        """One request; `form`: multipart `files` and `data` instead of a JSON body."""
        headers = {"Authorization": f"Bearer {self._settings.api_key}"}
        try:
            response = self._session.request(
                method,
                self._base + path,
                json=body,
                params=params,
                headers=headers,
                timeout=self._timeout,
                stream=stream,
                **(form or {}),
            )
        except requests.Timeout:
            raise DifyError(f"Dify {path} timed out", code="timeout", retryable=True) from None
        except requests.RequestException as exc:
            raise DifyError(
                f"Dify {path} unreachable: {type(exc).__name__}", code="network", retryable=True
            ) from None
        if response.status_code >= 400:
            error = _http_error(response)
            response.close()
            raise error
        return response

    @staticmethod
    def _json(response: requests.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except (ValueError, requests.RequestException):
            raise DifyError(
                "Dify answered with invalid JSON", code="bad_response", retryable=True
            ) from None
        if not isinstance(data, dict):
            raise DifyError("Dify answered with a non-object", code="bad_response", retryable=True)
        return data

    def _stream(self, call: _Call, path: str, body: dict[str, Any]) -> DifyAnswer:
        call.posts += 1
        response = self._send("POST", path, body, stream=True)
        # From here Dify has accepted: it recorded the message (and any new conversation).
        progress = _Progress(conversation_id=str(body.get("conversation_id") or ""))
        with response:
            if response.headers.get("Content-Type", "").startswith("application/json"):
                # A blocking-style answer (some proxies buffer SSE away): take it as is.
                data = self._json(response)
                if path == "/workflows/run":
                    run = data.get("data") or {}
                    run_id = str(data.get("workflow_run_id") or "")
                    return self._workflow_result(run if isinstance(run, dict) else {}, run_id)
                return DifyAnswer(
                    text=str(data.get("answer", "")),
                    conversation_id=str(data.get("conversation_id", "") or ""),
                    message_id=str(data.get("message_id") or data.get("id") or ""),
                )
            try:
                return self._read_stream(call, path, response, progress)
            except requests.ConnectionError as exc:
                timed_out = any(isinstance(arg, ReadTimeoutError) for arg in exc.args)
                raise _StreamBroken(path, "timeout" if timed_out else "network", progress) from None
            except requests.RequestException:
                raise _StreamBroken(path, "network", progress) from None
            except (ValueError, UnicodeDecodeError):
                raise _StreamBroken(path, "bad_response", progress) from None

    def _read_stream(
        self, call: _Call, path: str, response: requests.Response, progress: _Progress
    ) -> DifyAnswer:
        for event in _sse_events(response):
            kind = event.get("event")
            progress.conversation_id = str(event.get("conversation_id") or progress.conversation_id)
            progress.message_id = str(event.get("message_id") or progress.message_id)
            progress.workflow_run_id = str(event.get("workflow_run_id") or progress.workflow_run_id)
            call.accepted(progress)
            if kind in ("message", "agent_message"):
                progress.answer += str(event.get("answer", ""))
                call.grew(progress.answer)
            elif kind == "message_replace":
                progress.answer = str(event.get("answer", ""))
                call.grew(progress.answer)
            elif kind == "text_chunk" and path == "/workflows/run":
                data = event.get("data") or {}
                progress.answer += str(data.get("text", "")) if isinstance(data, dict) else ""
                call.grew(progress.answer)
            elif kind == "message_file":
                attached = dify_file(event)
                if attached is not None:
                    progress.files.append(attached)
            elif kind == "message_end":
                message_id = progress.message_id or str(event.get("id", ""))
                files = tuple(progress.files)
                return DifyAnswer(progress.answer, progress.conversation_id, message_id, files)
            elif kind == "workflow_finished" and path == "/workflows/run":
                data = event.get("data") or {}
                return self._workflow_result(data, progress.workflow_run_id)
            elif kind == "workflow_paused":
                data = event.get("data") or {}
                raise DifyPausedError(progress.workflow_run_id, data.get("reasons"))
            elif kind == "error":
                raise _stream_error(event)
            # ping, agent_thought, tts_*, node events: nothing to send
        raise _StreamBroken(path, "stream_incomplete", progress)

    # --- recovery of a broken stream -------------------------------------------------------

    def _recover(self, broken: _StreamBroken, query: str, user: str) -> DifyAnswer:
        progress = broken.progress
        log.warning(
            "Dify stream broke after Dify accepted the question (%s); fetching the answer "
            "instead of asking again (conversation %s, message %s, workflow run %s)",
            broken.code,
            progress.conversation_id or "-",
            progress.message_id or "-",
            progress.workflow_run_id or "-",
        )
        fetch: Callable[[], DifyAnswer | None]
        if progress.workflow_run_id:
            fetch = lambda: self._fetch_run(progress.workflow_run_id)  # noqa: E731
        elif progress.conversation_id:
            fetch = lambda: self._fetch_message(progress, query, user)  # noqa: E731
        else:
            self._metrics.inc("wecom_bridge_dify_recoveries_total", {"outcome": "lost"})
            raise DifyError(
                f"{broken}; Dify named no conversation to fetch the answer from",
                code="stream_lost",
            )
        try:
            answer = self._poll(fetch)
        except DifyError:
            self._metrics.inc("wecom_bridge_dify_recoveries_total", {"outcome": "lost"})
            raise
        self._metrics.inc("wecom_bridge_dify_recoveries_total", {"outcome": "recovered"})
        return answer

    def _poll(self, fetch: Callable[[], DifyAnswer | None]) -> DifyAnswer:
        budget = self._settings.recover_seconds
        waited, step = 0.0, max(0.1, self._settings.backoff_base)
        while True:
            try:
                answer = fetch()
            except DifyError as exc:
                if not exc.retryable:
                    raise
                answer = None
            if answer is not None:
                return answer
            if waited >= budget:
                raise DifyError(
                    f"the answer did not appear within {budget:g} s", code="stream_lost"
                )
            pause = min(step, budget - waited, RECOVER_STEP_MAX)
            self._sleep(pause)
            waited += pause
            step *= 2

    def _fetch_message(self, progress: _Progress, query: str, user: str) -> DifyAnswer | None:
        """The accepted message's answer from GET /messages (None: not finished yet)."""
        params = {"conversation_id": progress.conversation_id, "user": user, "limit": "20"}
        page = self._json(self._send("GET", "/messages", params=params))
        messages = [m for m in page.get("data") or [] if isinstance(m, dict)]
        if progress.message_id:
            mine = [m for m in messages if m.get("id") == progress.message_id]
        else:  # broke before any event: the newest message with this question
            mine = [m for m in messages if m.get("query") == query][-1:]
        if not mine:
            return None
        message = mine[0]
        if message.get("status") == "error":
            raise DifyError(
                f"Dify's message failed: {message.get('error') or 'no error text'}",
                code="message_error",
            )
        answer = str(message.get("answer") or "")
        if not answer:
            return None
        stored = message.get("message_files") or []
        files = tuple(
            f for f in (dify_file(d) for d in stored if isinstance(d, dict)) if f is not None
        )
        return DifyAnswer(answer, progress.conversation_id, str(message.get("id") or ""), files)

    def _fetch_run(self, run_id: str) -> DifyAnswer | None:
        """The run's result from GET /workflows/run/<id> (None: still running)."""
        run = self._json(self._send("GET", f"/workflows/run/{run_id}"))
        if run.get("status") in ("running", None, ""):
            return None
        return self._workflow_result(run, run_id)
