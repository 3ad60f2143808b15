"""Client for Dify's Service API: one question in, one answer text out.

Chat, Chatflow and Agent apps are asked through /chat-messages and completion apps through
/completion-messages, both streaming (SSE keeps the connection alive with pings, so a read timeout
catches a stalled Dify without cutting long answers); workflow apps through /workflows/run.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from urllib3.exceptions import ReadTimeoutError

from wecom_bridge.errors import ConversationNotFoundError, DifyError
from wecom_bridge.metrics import Metrics

log = logging.getLogger("wecom_bridge.dify")
_T = TypeVar("_T")

# Dify's app modes, as /v1/info reports them; the first three answer through /chat-messages.
APP_MODES = ("chat", "advanced-chat", "agent-chat", "completion", "workflow")
CHAT_MODES = frozenset(APP_MODES[:3])
# Workflow outputs tried in this order when none is configured.
WORKFLOW_OUTPUT_NAMES = ("answer", "text", "result", "output")


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


@dataclass(frozen=True)
class DifyAnswer:
    text: str
    conversation_id: str = ""
    message_id: str = ""


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
    return DifyError(message, status=status, code=code, retryable=_retryable_status(status))


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
        self._session = session or requests.Session()
        self._sleep = sleep
        self._timeout = (settings.connect_timeout, settings.read_timeout)
        self._mode: str | None = settings.app_mode
        self._mode_lock = threading.Lock()
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

    def ask(self, query: str, user: str, conversation_id: str = "") -> DifyAnswer:
        started = time.monotonic()
        try:
            mode = self.app_mode()
            if mode in CHAT_MODES:
                return self._chat(query, user, conversation_id)
            if mode == "completion":
                body = self._body(user, inputs={self._settings.query_input: query})
                return self._with_retries(lambda: self._stream("/completion-messages", body))
            return self._workflow(query, user)
        except DifyError as exc:
            self._metrics.inc("wecom_bridge_dify_errors_total", {"code": exc.code or "unknown"})
            raise
        finally:
            self._metrics.observe("wecom_bridge_dify_latency_seconds", time.monotonic() - started)

    # --- modes -----------------------------------------------------------------------------

    def _body(self, user: str, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"inputs": {}, "user": user, "response_mode": "streaming"}
        body.update(fields)
        return body

    def _chat(self, query: str, user: str, conversation_id: str) -> DifyAnswer:
        body = self._body(user, query=query, conversation_id=conversation_id)
        try:
            return self._with_retries(lambda: self._stream("/chat-messages", body))
        except ConversationNotFoundError:
            if not conversation_id:
                raise
            log.info("Dify forgot conversation %s; starting a new one", conversation_id)
        fresh = self._body(user, query=query, conversation_id="")
        return self._with_retries(lambda: self._stream("/chat-messages", fresh))

    def _workflow(self, query: str, user: str) -> DifyAnswer:
        body = self._body(
            user, inputs={self._settings.query_input: query}, response_mode="blocking"
        )
        result = self._with_retries(lambda: self._json(self._send("POST", "/workflows/run", body)))
        data = result.get("data") or {}
        status = data.get("status")
        if status != "succeeded":
            raise DifyError(
                f"workflow {status}: {data.get('error') or 'no error text'}",
                code=f"workflow_{status}",
                retryable=False,
            )
        text = self._pick_output(data.get("outputs") or {})
        return DifyAnswer(text=text, message_id=str(result.get("workflow_run_id", "")))

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
        self, method: str, path: str, body: dict[str, Any] | None = None, *, stream: bool = False
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {self._settings.api_key}"}
        try:
            response = self._session.request(
                method,
                self._base + path,
                json=body,
                headers=headers,
                timeout=self._timeout,
                stream=stream,
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

    def _stream(self, path: str, body: dict[str, Any]) -> DifyAnswer:
        response = self._send("POST", path, body, stream=True)
        with response:
            if response.headers.get("Content-Type", "").startswith("application/json"):
                # A blocking-style answer (some proxies buffer SSE away): take it as is.
                data = self._json(response)
                return DifyAnswer(
                    text=str(data.get("answer", "")),
                    conversation_id=str(data.get("conversation_id", "") or ""),
                    message_id=str(data.get("message_id") or data.get("id") or ""),
                )
            try:
                return self._read_stream(path, response)
            except requests.ConnectionError as exc:
                timed_out = any(isinstance(arg, ReadTimeoutError) for arg in exc.args)
                code = "timeout" if timed_out else "network"
                raise DifyError(
                    f"Dify {path} stream broke: {code}", code=code, retryable=True
                ) from None
            except requests.RequestException as exc:
                raise DifyError(
                    f"Dify {path} stream broke: {type(exc).__name__}",
                    code="network",
                    retryable=True,
                ) from None
            except (ValueError, UnicodeDecodeError):
                raise DifyError(
                    f"Dify {path} sent a malformed event", code="bad_response", retryable=True
                ) from None

    @staticmethod
    def _read_stream(path: str, response: requests.Response) -> DifyAnswer:
        answer, conversation_id, message_id = "", "", ""
        for event in _sse_events(response):
            kind = event.get("event")
            conversation_id = str(event.get("conversation_id") or conversation_id)
            message_id = str(event.get("message_id") or message_id)
            if kind in ("message", "agent_message"):
                answer += str(event.get("answer", ""))
            elif kind == "message_replace":
                answer = str(event.get("answer", ""))
            elif kind == "message_end":
                return DifyAnswer(answer, conversation_id, message_id or str(event.get("id", "")))
            elif kind == "error":
                status = int(event.get("status") or 500)
                raise DifyError(
                    str(event.get("message") or "Dify stream error"),
                    status=status,
                    code=str(event.get("code") or "stream_error"),
                    retryable=_retryable_status(status),
                )
            # ping, agent_thought, message_file, tts_*, workflow/node events: nothing to send
        raise DifyError(
            f"Dify {path} stream ended before message_end", code="stream_incomplete", retryable=True
        )
