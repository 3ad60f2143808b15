"""A double of Dify's Service API (/v1) plus the few console/health calls provisioning uses.

Answers contain the query verbatim (tests can match an answer to its question). Faults, hangs,
moderation replacements, cut streams, a fixed answer, a latency, workflow run statuses, reasoning
text and the app's input form are injectable from Python or through the JSON control API under
/_double/.

What it mirrors of Dify's server (api/libs/helper.py, api/core/app/apps/*, the service API
controllers): the message (and a new conversation) is recorded before the model runs, so a broken
stream leaves a message that `GET /v1/messages` shows with its answer once generation ends;
streams send `ping` every `ping_interval` seconds while the model thinks, a blocking response sends
nothing until the end; workflow runs stream `text_chunk` and end with `workflow_finished` (status
succeeded, partial-succeeded, failed or stopped) or `workflow_paused`, and are listed by
`GET /v1/workflows/run/<id>`; only declared inputs are kept and a missing required one is 400
`invalid_param`; a conversation id that is not a UUID is 400 `invalid_param`. Answers can carry
files (`message_file` events, markdown links to signed /files/… URLs it serves:
dify_signed_files.py).
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
from wecom_bridge.testing.dify_files import DifyFiles, describe, mount_files
from wecom_bridge.testing.dify_signed_files import DifyAnswerFiles, mount_answer_files
from wecom_bridge.testing.server import required_env

DIFY_VERSION = "1.17.1"
CHAT_MODES = ("chat", "advanced-chat", "agent-chat")
MODES = (*CHAT_MODES, "completion", "workflow")
STREAM_CHUNKS = 4
PING_INTERVAL = 10.0  # Dify's SSE keep-alive
WORKFLOW_STATUSES = ("succeeded", "partial-succeeded", "failed", "stopped", "paused")
# What a completion or workflow app declares when a test does not say: the input for the question.
QUERY_FORM = ({"text-input": {"variable": "query", "label": "query", "required": True}},)


@dataclass(frozen=True)
class Fault:
    status: int
    code: str
    message: str
    in_stream: bool = False  # as an `error` event in a 200 stream, the way Dify reports failures


@dataclass(frozen=True)
class Hang:
    seconds: float
    # mid_stream: after the first event that names the message (the first answer chunk;
    # workflow_started for a workflow) instead of before the response starts
    mid_stream: bool = False


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
    _statuses: deque[str] = field(default_factory=deque)
    ping_interval: float = PING_INTERVAL
    chunk_chars: int = 0  # 0: STREAM_CHUNKS chunks, sent at once
    chunk_interval: float = 0.0
    reasoning: str | None = None  # put into the answer as <think>…</think>, like DeepSeek-R1
    input_form: list[dict[str, Any]] | None = None  # None: QUERY_FORM (completion/workflow) or []
    messages: list[dict[str, Any]] = field(default_factory=list)  # every message created
    workflow_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Files answers link to (dify_signed_files.py: signed /files/… links, markers like #image).
    answer_files: DifyAnswerFiles = field(default_factory=DifyAnswerFiles)
    files: DifyFiles = field(default_factory=DifyFiles)  # uploads, file and speech settings

    def workflow_status_next(self, status: str, times: int = 1) -> None:
        """The next workflow runs end with `status` (succeeded by default)."""
        if status not in WORKFLOW_STATUSES:
            raise ValueError(f"status must be one of {WORKFLOW_STATUSES}")
        with self.lock:
            self._statuses.extend([status] * times)

    def set_input_form(self, form: list[dict[str, Any]] | None) -> None:
        """The app's user_input_form, as GET /v1/parameters lists it (None: the default)."""
        with self.lock:
            self.input_form = form

    def form(self) -> list[dict[str, Any]]:
        with self.lock:
            if self.input_form is not None:
                return list(self.input_form)
        return list(QUERY_FORM) if self.mode in ("completion", "workflow") else []

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

    def set_pace(self, chunk_chars: int, chunk_interval: float) -> None:
        """Stream answers as a model writes them: `chunk_chars` characters per `message`
        event, one event every `chunk_interval` seconds (0 chars: the default 4 chunks)."""
        with self.lock:
            self.chunk_chars = chunk_chars
            self.chunk_interval = chunk_interval

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
            self._statuses.clear()
            self.answer = None
            self.delay = 0.0
            self.chunk_chars = 0
            self.chunk_interval = 0.0
            self.reasoning = None
            self.input_form = None
            self.messages.clear()
            self.workflow_runs.clear()
        self.files.reset()
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

    def take_status(self) -> str:
        with self.lock:
            return self._statuses.popleft() if self._statuses else "succeeded"

    def answer_for(self, query: str) -> str:
        with self.lock:
            fixed, reasoning = self.answer, self.reasoning
        text = fixed if fixed is not None else self.answer_template.format(query=query)
        return f"<think>\n{reasoning}\n</think>\n\n{text}" if reasoning is not None else text

    def message_view(self, message: dict[str, Any]) -> dict[str, Any]:
        """A recorded message as GET /v1/messages shows it now: the answer is empty until the
        generation ended (Dify fills it in at message_end, whether or not a client listened)."""
        done = time.time() >= message["_ready_at"]
        view = {k: v for k, v in message.items() if not k.startswith("_")}
        if not done:
            view.update(answer="", status="normal", error=None)
        return view


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
    inputs: dict[str, Any] = field(default_factory=dict)
    files: tuple[dict[str, Any], ...] = ()  # message_file events, sent after the text
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


def _paced_chunks(state: DifyDoubleState, text: str) -> list[str]:
    if not state.chunk_chars:
        return _chunks(text, STREAM_CHUNKS)
    size = state.chunk_chars
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
    ping_interval: float = PING_INTERVAL,
    files_url: str = "",
    secret_key: str = "",
) -> Flask:
    """`setup_file`: where the first admin's setup time is kept across restarts (real Dify keeps
    it in PostgreSQL); without one it is forgotten with the process."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    state = DifyDoubleState(
        api_key=api_key,
        mode=mode,
        delay=delay,
        answer_template=answer_template,
        ping_interval=ping_interval,
    )
    if setup_file is not None and setup_file.exists():
        state.setup_at = setup_file.read_text(encoding="utf-8").strip() or None
    state.answer_files.files_url = files_url.rstrip("/")  # Dify's FILES_URL: absolute links
    if secret_key:  # Dify's SECRET_KEY signs its file links
        state.answer_files.secret_key = secret_key
    app = Flask("dify_double")
    app.extensions["dify_double"] = state
    mount_answer_files(app, state.answer_files)

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
                "user_input_form": state.form(),
                **state.files.parameters(),
            }
        )

    @app.post("/v1/chat-messages")
    def chat_messages() -> Response:
        if state.mode not in CHAT_MODES:
            return _error(
                400, "not_chat_app", "Please check if your app mode matches the right API route."
            )
        body = request.get_json(force=True, silent=True) or {}
        return _answer(state, body, chat=True)

    @app.post("/v1/completion-messages")
    def completion_messages() -> Response:
        if state.mode != "completion":
            return _error(
                400,
                "not_completion_app",
                "Please check if your app mode matches the right API route.",
            )
        body = request.get_json(force=True, silent=True) or {}
        return _answer(state, body, chat=False)

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

    @app.get("/v1/messages")
    def list_messages() -> Response:
        if state.mode not in CHAT_MODES:
            return _error(
                400, "not_chat_app", "Please check if your app mode matches the right API route."
            )
        return _list_messages(state)

    @app.get("/v1/workflows/run/<run_id>")
    def workflow_run(run_id: str) -> Response:
        return _workflow_run(state, run_id)

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
    mount_files(app, state.files)
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


def _input_query(inputs: dict[str, Any], body: dict[str, Any]) -> str:
    query = inputs.get("query")
    if isinstance(query, str):
        return query
    strings = [v for v in inputs.values() if isinstance(v, str)]
    if strings:
        return strings[0]
    return str(body.get("query", ""))


def _form_variables(form: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The variables of a user_input_form: [{"text-input": {"variable", "required", …}}, …]."""
    variables = []
    for item in form:
        for spec in item.values():
            if isinstance(spec, dict) and spec.get("variable"):
                variables.append(spec)
    return variables


def _check_inputs(state: DifyDoubleState, body: dict[str, Any]) -> dict[str, Any] | Response:
    """Dify keeps only the declared inputs (others are dropped silently); a required one missing
    or empty is 400 invalid_param, on every message."""
    given = body.get("inputs") or {}
    if not isinstance(given, dict):
        return _error(400, "invalid_param", "inputs must be an object")
    kept: dict[str, Any] = {}
    for spec in _form_variables(state.form()):
        name = str(spec["variable"])
        value = given.get(name)
        if value is None or value == "":
            if spec.get("required"):
                return _error(400, "invalid_param", f"{name} is required in input form")
            continue
        kept[name] = value
    return kept


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _prepare(state: DifyDoubleState, body: dict[str, Any], *, chat: bool) -> _Turn | Response:
    """Validate like Dify does, record the message (Dify writes it before the model runs) and
    consume the injected behaviours; a Response is an error."""
    if not body.get("user"):
        return _error(400, "invalid_param", "user is required")
    inputs = _check_inputs(state, body)
    if isinstance(inputs, Response):
        return inputs
    query = str(body.get("query", "")) if chat else _input_query(inputs, body)
    if chat and not query:
        return _error(400, "invalid_param", "query is required")
    streaming = body.get("response_mode") == "streaming"
    if state.mode == "agent-chat" and not streaming:
        return _error(400, "invalid_param", "Agent Chat App does not support blocking mode")
    conversation_id = ""
    if chat:
        conversation_id = str(body.get("conversation_id") or "")
        if conversation_id and not _is_uuid(conversation_id):
            return _error(
                400, "invalid_param", f"conversation_id: {conversation_id} is not a valid uuid."
            )
        with state.lock:
            known = state.conversations.get(conversation_id) if conversation_id else None
            if conversation_id and (known is None or known["user"] != body["user"]):
                return _error(404, "not_found", "Conversation Not Exists.")
            if not conversation_id:
                conversation_id = str(uuid.uuid4())
                state.conversations[conversation_id] = {"user": body["user"], "turns": 0}
            state.conversations[conversation_id]["turns"] += 1
    used_files = state.files.check_message_files(body) if chat else []
    if isinstance(used_files, Response):
        return used_files
    fault, hang, replacement, cut, delay = state.take()
    if hang is not None and not hang.mid_stream:
        state.wake.wait(hang.seconds)
        hang = None
    if fault is not None and not (fault.in_stream and streaming):
        return _error(fault.status, fault.code, fault.message)
    answer, files = state.answer_files.answer_with_files(
        query, state.answer_for(query) + describe(used_files)
    )
    turn = _Turn(
        answer=answer,
        files=tuple(files),
        conversation_id=conversation_id,
        streaming=streaming,
        replacement=replacement,
        cut=cut,
        delay=delay,
        hang=hang,
        fault=fault,
        inputs=inputs,
    )
    if chat:
        _record_message(state, turn, body, query)
    return turn


def _record_message(state: DifyDoubleState, turn: _Turn, body: dict[str, Any], query: str) -> None:
    """The message as Dify stores it; its answer shows once the generation has ended."""
    now = time.time()
    busy = turn.delay + (turn.hang.seconds if turn.hang is not None else 0.0)
    failed = turn.fault is not None
    message = {
        "id": turn.message_id,
        "conversation_id": turn.conversation_id,
        "parent_message_id": None,
        "inputs": turn.inputs,
        "query": query,
        "answer": "" if failed else (turn.replacement or turn.answer),
        "message_files": [
            {k: f[k] for k in ("id", "type", "url", "belongs_to")} for f in turn.files
        ],
        "feedback": None,
        "retriever_resources": [],
        "agent_thoughts": [],
        "created_at": int(now),
        "status": "error" if failed else "normal",
        "error": turn.fault.message if turn.fault is not None else None,
        "_user": body["user"],
        "_ready_at": now + busy,
    }
    with state.lock:
        state.messages.append(message)


def _pinging_wait(state: DifyDoubleState, seconds: float) -> Iterator[str]:
    """The model thinking for `seconds`: Dify keeps the stream alive with a ping now and then."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, state.ping_interval))
        if deadline - time.monotonic() > 0:
            yield "event: ping\n\n"


def _answer(state: DifyDoubleState, body: dict[str, Any], *, chat: bool) -> Response:
    turn = _prepare(state, body, chat=chat)
    if isinstance(turn, Response):
        return turn
    query = str(body.get("query", "")) if chat else _input_query(turn.inputs, body)
    if not turn.streaming:
        time.sleep(turn.delay)  # blocking: not one byte before the end
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
    if state.mode == "advanced-chat":
        yield _sse({"event": "workflow_started", **common, "data": {"id": str(uuid.uuid4())}})
        yield _sse({"event": "node_started", **common, "data": {"node_type": "llm"}})
    yield from _pinging_wait(state, turn.delay)
    if state.mode == "agent-chat":
        yield _sse({"event": "agent_thought", **common, "thought": "", "position": 1})
    kind = "agent_message" if state.mode == "agent-chat" else "message"
    for index, chunk in enumerate(_paced_chunks(state, turn.answer)):
        yield _sse({"event": kind, "id": turn.message_id, **common, "answer": chunk})
        if index == 0 and turn.hang is not None:  # stalled: not even a ping
            state.wake.wait(turn.hang.seconds)
        elif state.chunk_interval:
            time.sleep(state.chunk_interval)
    if turn.fault is not None:
        yield _error_event(common, turn.fault)
        return
    if turn.replacement is not None:
        yield _sse({"event": "message_replace", **common, "answer": turn.replacement})
    if turn.cut:
        return
    for attached in turn.files:  # a tool's files, once the text is written
        yield _sse({**attached, "conversation_id": turn.conversation_id})
    if state.mode == "advanced-chat":
        yield _sse({"event": "node_finished", **common, "data": {"node_type": "llm"}})
        yield _sse({"event": "workflow_finished", **common, "data": {"status": "succeeded"}})
    usage = _usage(query, turn.answer, turn.delay)
    yield _sse(
        {"event": "message_end", "id": turn.message_id, **common, "metadata": {"usage": usage}}
    )


def _outputs(answer: str, turn: _Turn) -> dict[str, Any]:
    """A run's outputs; a tool's files (#image) as a `files` output of File objects, the way
    Dify serialises them (api/core/file/models.py File.to_dict)."""
    outputs: dict[str, Any] = {"answer": answer}
    if turn.files:
        outputs["files"] = [
            {
                "dify_model_identity": "__dify__file__",
                "id": None,
                "type": f["type"],
                "transfer_method": "tool_file",
                "remote_url": None,
                "related_id": f["id"],
                "filename": f"{f['id']}.png",
                "extension": ".png",
                "mime_type": "image/png",
                "size": -1,
                "url": f["url"],
            }
            for f in turn.files
        ]
    return outputs


def _run_record(run_id: str, status: str, answer: str, query: str, turn: _Turn) -> dict[str, Any]:
    """A workflow run as `workflow_finished` and GET /v1/workflows/run/<id> show it."""
    ok = status in ("succeeded", "partial-succeeded")
    errors = {"failed": "node llm run failed: model error", "stopped": "Workflow stopped."}
    now = int(time.time())
    return {
        "id": run_id,
        "workflow_id": "double-workflow",
        "status": status,
        "inputs": turn.inputs,
        "outputs": _outputs(answer, turn) if ok or status == "paused" else {},
        "error": errors.get(status) or (turn.fault.message if turn.fault else None),
        "elapsed_time": turn.delay,
        "total_tokens": len(query) + len(answer),
        "total_steps": 3,
        "created_at": now,
        "finished_at": None if status == "paused" else now,
    }


def _workflow(state: DifyDoubleState, body: dict[str, Any]) -> Response:
    turn = _prepare(state, body, chat=False)
    if isinstance(turn, Response):
        return turn
    query = _input_query(turn.inputs, body)
    run_id = str(uuid.uuid4())
    status = state.take_status() if turn.fault is None else "failed"
    final = _run_record(run_id, status, turn.answer, query, turn)
    busy = turn.delay + (turn.hang.seconds if turn.hang is not None else 0.0)
    with state.lock:  # the run exists from the start; it shows its end once it has ended
        state.workflow_runs[run_id] = {
            **final,
            "_user": body["user"],
            "_ready_at": time.time() + busy,
            "_running": {**final, "status": "running", "outputs": {}, "finished_at": None},
        }
    if not turn.streaming:
        time.sleep(turn.delay)  # blocking: not one byte before the end
        return jsonify({"task_id": turn.task_id, "workflow_run_id": run_id, "data": final})

    def events() -> Iterator[str]:
        common = {"task_id": turn.task_id, "workflow_run_id": run_id}
        yield "event: ping\n\n"
        yield _sse({"event": "workflow_started", **common, "data": {"id": run_id}})
        if turn.hang is not None:  # stalled: not even a ping
            state.wake.wait(turn.hang.seconds)
        yield _sse({"event": "node_started", **common, "data": {"node_type": "llm"}})
        yield from _pinging_wait(state, turn.delay)
        if status in ("succeeded", "partial-succeeded", "paused"):
            for chunk in _chunks(turn.answer, STREAM_CHUNKS):
                yield _sse({"event": "text_chunk", **common, "data": {"text": chunk}})
        if turn.fault is not None:
            yield _error_event(common, turn.fault)
            return
        if turn.cut:
            return
        if status == "paused":
            paused = {
                "workflow_run_id": run_id,
                "paused_nodes": ["human_input"],
                "outputs": {},
                "reasons": [{"type": "human_input_required", "node_id": "human_input"}],
                "status": "paused",
                "created_at": final["created_at"],
                "elapsed_time": turn.delay,
                "total_tokens": final["total_tokens"],
                "total_steps": 2,
            }
            yield _sse({"event": "workflow_paused", **common, "data": paused})
            return
        yield _sse({"event": "node_finished", **common, "data": {"node_type": "llm"}})
        yield _sse({"event": "workflow_finished", **common, "data": final})

    return Response(events(), mimetype="text/event-stream")


def _list_messages(state: DifyDoubleState) -> Response:
    """GET /v1/messages: the latest `limit` messages of a conversation, oldest first (as Dify's
    MessageService.pagination_by_first_id pages them), `first_id` pages further back."""
    user = request.args.get("user", "")
    conversation_id = request.args.get("conversation_id", "")
    if not conversation_id or not _is_uuid(conversation_id):
        return _error(400, "invalid_param", "conversation_id: is not a valid uuid.")
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        return _error(400, "invalid_param", "limit must be an integer")
    if not 1 <= limit <= 100:
        return _error(400, "invalid_param", "limit must be between 1 and 100")
    with state.lock:
        known = state.conversations.get(conversation_id)
        if known is None or known["user"] != user:
            return _error(404, "not_found", "Conversation Not Exists.")
        history = [m for m in state.messages if m["conversation_id"] == conversation_id]
    first_id = request.args.get("first_id", "")
    if first_id:
        ids = [m["id"] for m in history]
        if first_id not in ids:
            return _error(404, "not_found", "First Message Not Exists.")
        history = history[: ids.index(first_id)]
    page = history[-limit:]
    return jsonify(
        {
            "limit": limit,
            "has_more": len(history) > len(page),
            "data": [state.message_view(m) for m in page],
        }
    )


def _workflow_run(state: DifyDoubleState, run_id: str) -> Response:
    with state.lock:
        run = state.workflow_runs.get(run_id)
    if run is None:
        return _error(404, "not_found", "Workflow run not found.")
    if time.time() < run["_ready_at"]:
        return jsonify(run["_running"])
    return jsonify({k: v for k, v in run.items() if not k.startswith("_")})


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

    @app.post("/_double/pace")
    def set_pace() -> Response:
        spec = request.get_json(force=True, silent=True) or {}
        state.set_pace(int(spec.get("chunk_chars", 0)), float(spec.get("chunk_interval", 0.0)))
        return jsonify({"ok": True})

    @app.post("/_double/workflow-status")
    def set_workflow_status() -> Response:
        spec = request.get_json(force=True, silent=True) or {}
        try:
            state.workflow_status_next(str(spec.get("status")), int(spec.get("times", 1)))
        except ValueError as exc:
            return _error(400, "invalid_param", str(exc))
        return jsonify({"ok": True})

    @app.post("/_double/reasoning")
    def set_reasoning() -> Response:
        spec = request.get_json(force=True, silent=True) or {}
        text = spec.get("text")
        with state.lock:
            state.reasoning = text if isinstance(text, str) else None
        return jsonify({"ok": True})

    @app.post("/_double/input-form")
    def set_input_form() -> Response:
        spec = request.get_json(force=True, silent=True) or {}
        form = spec.get("user_input_form")
        state.set_input_form(form if isinstance(form, list) else None)
        return jsonify({"ok": True})

    @app.get("/_double/messages")
    def recorded_messages() -> Response:
        with state.lock:
            return jsonify({"messages": [dict(m) for m in state.messages]})

    @app.post("/_double/reset")
    def reset() -> Response:
        state.reset()
        return jsonify({"ok": True})


def dify_double_from_env() -> Flask:
    """DIFY_API_KEY (the key it accepts), DIFY_DOUBLE_MODE (chat), DIFY_DOUBLE_DELAY_MS (0),
    DIFY_DOUBLE_PING_SECONDS (10, Dify's keep-alive interval), DIFY_DOUBLE_STATE_DIR (where the
    setup state survives restarts; unset: in memory), and Dify's own FILES_URL (absolute file links)
    and SECRET_KEY (signs them)."""
    mode = os.environ.get("DIFY_DOUBLE_MODE", "chat")
    if mode not in MODES:
        raise ConfigError("DIFY_DOUBLE_MODE", f"must be one of {', '.join(MODES)}")
    delay_ms = os.environ.get("DIFY_DOUBLE_DELAY_MS", "0")
    if not delay_ms.isdigit():
        raise ConfigError("DIFY_DOUBLE_DELAY_MS", "must be a whole number of milliseconds")
    ping = os.environ.get("DIFY_DOUBLE_PING_SECONDS", "").strip() or str(PING_INTERVAL)
    try:
        ping_interval = float(ping)
    except ValueError:
        raise ConfigError("DIFY_DOUBLE_PING_SECONDS", "must be a number of seconds") from None
    if ping_interval <= 0:
        raise ConfigError("DIFY_DOUBLE_PING_SECONDS", "must be more than 0")
    state_dir = os.environ.get("DIFY_DOUBLE_STATE_DIR", "").strip()
    return create_dify_double(
        # Dify's own variable (the compose file passes it to the api container): file links
        # in answers are absolute under it, relative when it is empty.
        files_url=os.environ.get("FILES_URL", "").strip(),
        secret_key=os.environ.get("SECRET_KEY", "").strip(),
        ping_interval=ping_interval,
        api_key=required_env("DIFY_API_KEY"),
        mode=mode,
        delay=int(delay_ms) / 1000,
        setup_file=Path(state_dir) / "dify-double-setup" if state_dir else None,
    )
