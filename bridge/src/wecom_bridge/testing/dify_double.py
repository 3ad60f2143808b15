"""A double of Dify's Service API (/v1) plus the few console/health calls provisioning uses.

Answers contain the query verbatim (tests can match an answer to its question). Faults, hangs,
moderation replacements, cut streams, a fixed answer and a latency are injectable from Python or
through the JSON control API under /_double/.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

from wecom_bridge.errors import ConfigError
from wecom_bridge.testing.server import required_env

DIFY_VERSION = "1.17.1"
CHAT_MODES = ("chat", "advanced-chat", "agent-chat")
MODES = (*CHAT_MODES, "completion", "workflow")
STREAM_CHUNKS = 4


@dataclass(frozen=True)
class Fault:
    status: int
    code: str
    message: str
    in_stream: bool = False  # as an `error` event in a 200 stream, the way Dify reports failures


@dataclass(frozen=True)
class Hang:
    seconds: float
    mid_stream: bool = False  # after the first ping instead of before the response starts


@dataclass
class DifyDoubleState:
    """Everything the double remembers; all access under `lock`."""

    api_key: str
    mode: str = "chat"
    delay: float = 0.0
    answer_template: str = "Dify double answer: {query}"
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[dict[str, Any]] = field(default_factory=list)
    conversations: dict[str, dict[str, Any]] = field(default_factory=dict)
    answer: str | None = None
    setup_at: str | None = None
    wake: threading.Event = field(default_factory=threading.Event)  # ends hangs early on reset
    _faults: deque[Fault] = field(default_factory=deque)
    _hangs: deque[Hang] = field(default_factory=deque)
    _replacements: deque[str] = field(default_factory=deque)
    _cuts: int = 0

    def fail_next(
        self,
        status: int,
        code: str = "internal_server_error",
        message: str = "Internal Server Error.",
        times: int = 1,
        *,
        in_stream: bool = False,
    ) -> None:
        with self.lock:
            self._faults.extend([Fault(status, code, message, in_stream)] * times)

    def hang_next(self, seconds: float, times: int = 1, *, mid_stream: bool = False) -> None:
        with self.lock:
            self._hangs.extend([Hang(seconds, mid_stream)] * times)

    def replace_next(self, text: str, times: int = 1) -> None:
        """The next streamed answers end with a message_replace (moderation) carrying `text`."""
        with self.lock:
            self._replacements.extend([text] * times)

    def cut_next(self, times: int = 1) -> None:
        """The next streams stop before message_end (a dropped connection)."""
        with self.lock:
            self._cuts += times

    def set_answer(self, text: str | None) -> None:
        """A fixed answer for every query (None: back to the template)."""
        with self.lock:
            self.answer = text

    def set_delay(self, seconds: float) -> None:
        with self.lock:
            self.delay = seconds

    def clear_requests(self) -> None:
        with self.lock:
            self.requests.clear()

    def reset(self) -> None:
        """Forget requests, conversations and pending faults; wake up hanging requests."""
        with self.lock:
            self.requests.clear()
            self.conversations.clear()
            self._faults.clear()
            self._hangs.clear()
            self._replacements.clear()
            self._cuts = 0
            self.answer = None
            self.delay = 0.0
        self.wake.set()
        self.wake.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.requests]

    # --- used by the routes -----------------------------------------------------------------

    def take(self) -> tuple[Fault | None, Hang | None, str | None, bool, float]:
        """Consume the next injected behaviours for one answering request."""
        with self.lock:
            fault = self._faults.popleft() if self._faults else None
            hang = self._hangs.popleft() if self._hangs else None
            replacement = self._replacements.popleft() if self._replacements else None
            cut = self._cuts > 0
            self._cuts -= int(cut)
            return fault, hang, replacement, cut, self.delay

    def answer_for(self, query: str) -> str:
        with self.lock:
            fixed = self.answer
        return fixed if fixed is not None else self.answer_template.format(query=query)


@dataclass(frozen=True)
class _Turn:
    """One answering request after validation."""

    answer: str
    conversation_id: str
    streaming: bool
    replacement: str | None
    cut: bool
    delay: float
    hang: Hang | None
    fault: Fault | None
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    task_id: str = field(default_factory=lambda: str(uuid.uuid4()))


def _error(status: int, code: str, message: str) -> Response:
    response = jsonify({"code": code, "message": message, "status": status})
    response.status_code = status
    return response


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error_event(common: dict[str, Any], fault: Fault) -> str:
    """A failure inside a 200 stream, as Dify sends it."""
    return _sse(
        {
            "event": "error",
            **common,
            "status": fault.status,
            "code": fault.code,
            "message": fault.message,
        }
    )


def _chunks(text: str, count: int) -> list[str]:
    size = max(1, -(-len(text) // count))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _usage(query: str, answer: str, delay: float) -> dict[str, Any]:
    prompt, completion = len(query), len(answer)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "total_price": "0",
        "currency": "USD",
        "latency": delay,
    }


def create_dify_double(
    *,
    api_key: str,
    mode: str = "chat",
    delay: float = 0.0,
    answer_template: str = "Dify double answer: {query}",
    setup_file: Path | None = None,
) -> Flask:
    """`setup_file`: where the first admin's setup time is kept across restarts (real Dify keeps
    it in PostgreSQL); without one it is forgotten with the process."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    state = DifyDoubleState(
        api_key=api_key, mode=mode, delay=delay, answer_template=answer_template
    )
    if setup_file is not None and setup_file.exists():
        state.setup_at = setup_file.read_text(encoding="utf-8").strip() or None
    app = Flask("dify_double")
    app.extensions["dify_double"] = state

    @app.before_request
    def authenticate() -> Response | None:
        if not request.path.startswith("/v1/"):
            return None
        _record(state)
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not key:
            return _error(
                401,
                "unauthorized",
                "Authorization header must be provided and start with 'Bearer'",
            )
        if not secrets.compare_digest(key.encode(), state.api_key.encode()):
            return _error(401, "unauthorized", "Access token is invalid")
        return None

    @app.get("/v1/info")
    def info() -> Response:
        return jsonify(
            {
                "name": "Dify double",
                "description": "Answers with the question in it",
                "tags": [],
                "mode": state.mode,
                "author_name": "wecom-bridge tests",
            }
        )

    @app.get("/v1/parameters")
    def parameters() -> Response:
        return jsonify(
            {
                "opening_statement": "",
                "suggested_questions": [],
                "suggested_questions_after_answer": {"enabled": False},
                "user_input_form": [],
                "file_upload": {"image": {"enabled": False}},
                "system_parameters": {"file_size_limit": 15, "image_file_size_limit": 10},
            }
        )

    @app.post("/v1/chat-messages")
    def chat_messages() -> Response:
        if state.mode not in CHAT_MODES:
            return _error(
                400, "not_chat_app", "Please check if your app mode matches the right API route."
            )
        body = request.get_json(force=True, silent=True) or {}
        return _answer(state, body, str(body.get("query", "")), chat=True)

    @app.post("/v1/completion-messages")
    def completion_messages() -> Response:
        if state.mode != "completion":
            return _error(
                400,
                "not_completion_app",
                "Please check if your app mode matches the right API route.",
            )
        body = request.get_json(force=True, silent=True) or {}
        return _answer(state, body, _input_query(body), chat=False)

    @app.post("/v1/workflows/run")
    def workflows_run() -> Response:
        if state.mode != "workflow":
            return _error(
                400,
                "not_workflow_app",
                "Please check if your app mode matches the right API route.",
            )
        body = request.get_json(force=True, silent=True) or {}
        return _workflow(state, body)

    @app.get("/health")
    def health() -> Response:
        return jsonify({"pid": os.getpid(), "status": "ok", "version": DIFY_VERSION})

    @app.get("/console/api/setup")
    def setup_status() -> Response:
        with state.lock:
            done = state.setup_at
        if done is None:
            return jsonify({"step": "not_started"})
        return jsonify({"step": "finished", "setup_at": done})

    @app.post("/console/api/setup")
    def setup() -> Response:
        body = request.get_json(force=True, silent=True) or {}
        if not all(body.get(k) for k in ("email", "name", "password")):
            return _error(400, "invalid_param", "email, name and password are required")
        with state.lock:
            if state.setup_at is not None:
                return _error(403, "already_setup", "Dify has been successfully installed.")
            state.setup_at = datetime.now(UTC).isoformat()
            if setup_file is not None:
                setup_file.write_text(state.setup_at, encoding="utf-8")
        response = jsonify({"result": "success"})
        response.status_code = 201
        return response

    _control_routes(app, state)
    return app


def _record(state: DifyDoubleState) -> None:
    """Remember a /v1 request (never its Authorization header)."""
    entry = {
        "method": request.method,
        "path": request.path,
        "json": request.get_json(force=True, silent=True),
        "received_at": time.time(),
    }
    with state.lock:
        state.requests.append(entry)


def _input_query(body: dict[str, Any]) -> str:
    inputs = body.get("inputs") or {}
    if isinstance(inputs, dict):
        query = inputs.get("query")
        if isinstance(query, str):
            return query
        strings = [v for v in inputs.values() if isinstance(v, str)]
        if strings:
            return strings[0]
    return str(body.get("query", ""))


def _prepare(
    state: DifyDoubleState, body: dict[str, Any], query: str, *, chat: bool
) -> _Turn | Response:
    """Validate like Dify does and consume the injected behaviours; a Response is an error."""
    if not body.get("user"):
        return _error(400, "invalid_param", "user is required")
    if chat and not query:
        return _error(400, "invalid_param", "query is required")
    streaming = body.get("response_mode") == "streaming"
    if state.mode == "agent-chat" and not streaming:
        return _error(400, "invalid_param", "Agent Chat App does not support blocking mode")
    conversation_id = ""
    if chat:
        conversation_id = str(body.get("conversation_id") or "")
        with state.lock:
            known = state.conversations.get(conversation_id) if conversation_id else None
            if conversation_id and (known is None or known["user"] != body["user"]):
                return _error(404, "not_found", "Conversation Not Exists.")
            if not conversation_id:
                conversation_id = str(uuid.uuid4())
                state.conversations[conversation_id] = {"user": body["user"], "turns": 0}
            state.conversations[conversation_id]["turns"] += 1
    fault, hang, replacement, cut, delay = state.take()
    if hang is not None and not hang.mid_stream:
        state.wake.wait(hang.seconds)
        hang = None
    if fault is not None and not (fault.in_stream and streaming):
        return _error(fault.status, fault.code, fault.message)
    return _Turn(
        answer=state.answer_for(query),
        conversation_id=conversation_id,
        streaming=streaming,
        replacement=replacement,
        cut=cut,
        delay=delay,
        hang=hang,
        fault=fault,
    )


def _answer(state: DifyDoubleState, body: dict[str, Any], query: str, *, chat: bool) -> Response:
    turn = _prepare(state, body, query, chat=chat)
    if isinstance(turn, Response):
        return turn
    if not turn.streaming:
        time.sleep(turn.delay)
        answer = turn.replacement if turn.replacement is not None else turn.answer
        return jsonify(
            {
                "event": "message",
                "task_id": turn.task_id,
                "id": turn.message_id,
                "message_id": turn.message_id,
                "conversation_id": turn.conversation_id,
                "mode": state.mode,
                "answer": answer,
                "metadata": {"usage": _usage(query, answer, turn.delay)},
                "created_at": int(time.time()),
            }
        )
    return Response(_stream(state, turn, query), mimetype="text/event-stream")


def _stream(state: DifyDoubleState, turn: _Turn, query: str) -> Iterator[str]:
    common = {
        "task_id": turn.task_id,
        "message_id": turn.message_id,
        "conversation_id": turn.conversation_id,
        "created_at": int(time.time()),
    }
    yield "event: ping\n\n"
    if turn.hang is not None:
        state.wake.wait(turn.hang.seconds)
    time.sleep(turn.delay)
    if state.mode == "advanced-chat":
        yield _sse({"event": "workflow_started", **common, "data": {"id": str(uuid.uuid4())}})
        yield _sse({"event": "node_started", **common, "data": {"node_type": "llm"}})
    if state.mode == "agent-chat":
        yield _sse({"event": "agent_thought", **common, "thought": "", "position": 1})
    kind = "agent_message" if state.mode == "agent-chat" else "message"
    for chunk in _chunks(turn.answer, STREAM_CHUNKS):
        yield _sse({"event": kind, "id": turn.message_id, **common, "answer": chunk})
    if turn.fault is not None:
        yield _error_event(common, turn.fault)
        return
    if turn.replacement is not None:
        yield _sse({"event": "message_replace", **common, "answer": turn.replacement})
    if turn.cut:
        return
    if state.mode == "advanced-chat":
        yield _sse({"event": "node_finished", **common, "data": {"node_type": "llm"}})
        yield _sse({"event": "workflow_finished", **common, "data": {"status": "succeeded"}})
    usage = _usage(query, turn.answer, turn.delay)
    yield _sse(
        {"event": "message_end", "id": turn.message_id, **common, "metadata": {"usage": usage}}
    )


def _workflow(state: DifyDoubleState, body: dict[str, Any]) -> Response:
    query = _input_query(body)
    turn = _prepare(state, body, query, chat=False)
    if isinstance(turn, Response):
        return turn
    run_id = str(uuid.uuid4())
    time.sleep(turn.delay)
    data = {
        "id": run_id,
        "workflow_id": "double-workflow",
        "status": "succeeded",
        "outputs": {"answer": turn.answer},
        "error": None,
        "elapsed_time": turn.delay,
        "total_tokens": len(query) + len(turn.answer),
        "total_steps": 3,
        "created_at": int(time.time()),
        "finished_at": int(time.time()),
    }
    if not turn.streaming:
        return jsonify({"task_id": turn.task_id, "workflow_run_id": run_id, "data": data})

    def events() -> Iterator[str]:
        common = {"task_id": turn.task_id, "workflow_run_id": run_id}
        yield "event: ping\n\n"
        if turn.hang is not None:
            state.wake.wait(turn.hang.seconds)
        yield _sse({"event": "workflow_started", **common, "data": {"id": run_id}})
        for chunk in _chunks(turn.answer, STREAM_CHUNKS):
            yield _sse({"event": "text_chunk", **common, "data": {"text": chunk}})
        if turn.fault is not None:
            yield _error_event(common, turn.fault)
            return
        yield _sse({"event": "workflow_finished", **common, "data": data})

    return Response(events(), mimetype="text/event-stream")


def _control_routes(app: Flask, state: DifyDoubleState) -> None:
    @app.get("/_double/requests")
    def list_requests() -> Response:
        return jsonify({"requests": state.snapshot()})

    @app.delete("/_double/requests")
    def clear_requests() -> Response:
        state.clear_requests()
        return jsonify({"ok": True})

    @app.get("/_double/conversations")
    def list_conversations() -> Response:
        with state.lock:
            return jsonify({"conversations": dict(state.conversations)})

    @app.delete("/_double/conversations")
    def forget_conversations() -> Response:
        """Dify lost every conversation (e.g. the app was recreated): next use → 404."""
        with state.lock:
            state.conversations.clear()
        return jsonify({"ok": True})

    @app.post("/_double/faults")
    def add_fault() -> Response:
        spec = request.get_json(force=True, silent=True) or {}
        times = int(spec.get("times", 1))
        if "hang" in spec:
            state.hang_next(float(spec["hang"]), times, mid_stream=bool(spec.get("mid_stream")))
        elif "status" in spec:
            state.fail_next(
                int(spec["status"]),
                str(spec.get("code", "internal_server_error")),
                str(spec.get("message", "Internal Server Error.")),
                times,
                in_stream=bool(spec.get("in_stream")),
            )
        else:
            return _error(400, "invalid_param", 'give "status" (with "code", "message") or "hang"')
        return jsonify({"ok": True})

    @app.post("/_double/answer")
    def set_answer() -> Response:
        spec = request.get_json(force=True, silent=True) or {}
        text = spec.get("text")
        state.set_answer(text if isinstance(text, str) else None)
        return jsonify({"ok": True})

    @app.post("/_double/delay")
    def set_delay() -> Response:
        spec = request.get_json(force=True, silent=True) or {}
        state.set_delay(float(spec.get("seconds", 0.0)))
        return jsonify({"ok": True})

    @app.post("/_double/reset")
    def reset() -> Response:
        state.reset()
        return jsonify({"ok": True})


def dify_double_from_env() -> Flask:
    """DIFY_API_KEY (the key it accepts), DIFY_DOUBLE_MODE (chat), DIFY_DOUBLE_DELAY_MS (0),
    DIFY_DOUBLE_STATE_DIR (where the setup state survives restarts; unset: in memory)."""
    mode = os.environ.get("DIFY_DOUBLE_MODE", "chat")
    if mode not in MODES:
        raise ConfigError("DIFY_DOUBLE_MODE", f"must be one of {', '.join(MODES)}")
    delay_ms = os.environ.get("DIFY_DOUBLE_DELAY_MS", "0")
    if not delay_ms.isdigit():
        raise ConfigError("DIFY_DOUBLE_DELAY_MS", "must be a whole number of milliseconds")
    state_dir = os.environ.get("DIFY_DOUBLE_STATE_DIR", "").strip()
    return create_dify_double(
        api_key=required_env("DIFY_API_KEY"),
        mode=mode,
        delay=int(delay_ms) / 1000,
        setup_file=Path(state_dir) / "dify-double-setup" if state_dir else None,
    )
