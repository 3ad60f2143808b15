"""A double of WeCom's server API (qyapi.weixin.qq.com) with the behaviour the bridge must survive.

It issues and checks access tokens, records every message/send body, truncates over-long texts and
drops sends beyond the per-member rate limit silently (as WeCom does), and answers with injected
errcodes on demand. A JSON control API under /_double/ lets out-of-process tests drive it.
`media/upload` takes files with WeCom's types and limits (doc 90389: image JPG/PNG ≤ 10 MB, voice
AMR ≤ 2 MB, video ≤ 10 MB, file ≤ 20 MB, each more than 5 bytes; errcodes 40004/40005/40006/40009/
44001) and gives media_ids valid 3 days, which image/file messages must name (else 40007).

It also plays the member's side for people: `GET /_double/chat` is a chat page whose messages go
out as real signed, encrypted callbacks to the bridge (`ChatCallback`), and whose replies are the
message/send bodies this double records — the whole WeCom path without WeCom.

With a journal file (WECOM_DOUBLE_JOURNAL) it remembers recorded messages and issued tokens across
its own restarts, as WeCom's servers would: fault tests restart the Docker engine it runs under.
The journal is owner-only (it holds the tokens) and is rewritten to the replayed state at start.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import requests
from flask import Flask, Response, jsonify, request

from wecom_bridge.testing.callbacks import CallbackClient
from wecom_bridge.testing.kf_double import DEFAULT_ACCOUNT, KfCallback, KfDoubleState, mount_kf
from wecom_bridge.testing.media_double import MediaShelf, mount_media_get
from wecom_bridge.testing.server import required_env
from wecom_bridge.wecom.crypto import WeComCrypto

TEXT_LIMIT = 2048
# media/upload's limits by type (WeCom doc 90389) and a media_id's lifetime.
UPLOAD_LIMITS = {"image": 10 << 20, "voice": 2 << 20, "video": 10 << 20, "file": 20 << 20}
MEDIA_ID_LIFETIME = 3 * 24 * 3600
DEFAULT_FAULT_IP = "203.0.113.7"
DEFAULT_RATE_LIMITS: tuple[tuple[int, float], ...] = ((30, 60.0), (1000, 3600.0))
APIS = ("gettoken", "send", "getcallbackip", "upload")
MAX_WAIT = 30.0  # seconds a long-polling GET /_double/messages may hold the request

ERRMSGS = {
    -1: "system busy",
    40001: "invalid credential",
    40013: "invalid corpid",
    40014: "invalid access_token",
    40056: "invalid agentid",
    41001: "access_token missing",
    42001: "access_token expired",
    44004: "empty content",
    45009: "reach max api daily quota limit",
    45033: "user call api concurrent out of limit",
    47001: "data format error",
    60020: "not allow to access from your ip",
    81013: "user & party & tag all invalid",
}


def errmsg(errcode: int, from_ip: str) -> str:
    """WeCom's errmsg layout: text, hint, the caller's IP, a link to the errcode explanation."""
    text = ERRMSGS.get(errcode, "error")
    hint = f"[{int(time.time())}-{secrets.token_hex(4)}]"
    return (
        f"{text}, hint: {hint}, from ip: {from_ip}, "
        f"more info at https://open.work.weixin.qq.com/devtool/query?e={errcode}"
    )


def _truncate(text: str, limit: int) -> str:
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


class Journal:
    """An append-only JSON-lines file of the state changes the double must not forget."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def entries(self) -> list[dict[str, Any]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [entry for line in lines if (entry := _complete_line(line)) is not None]

    def append(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            self._file = self._open(self.path, os.O_APPEND)
            if self._file.tell():
                self._file.write("\n")  # ends a line a kill may have cut short
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()

    def rewrite(self, entries: list[dict[str, Any]]) -> None:
        """Replace the journal by `entries` (the state it replays to), so it stays as small as
        the state instead of growing with every call; atomic, a crash leaves the old one.
        Called at start only, before the double serves (hence no lock)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        staging = self.path.with_name(self.path.name + ".new")
        staging.unlink(missing_ok=True)  # a leftover would keep its old mode
        with self._open(staging, os.O_TRUNC) as out:
            out.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries)
            out.flush()
            os.fsync(out.fileno())
        staging.replace(self.path)

    @staticmethod
    def _open(path: Path, mode_flag: int) -> TextIO:
        # Owner-only: it holds the access tokens the double issued.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode_flag, 0o600)
        return open(fd, "a", encoding="utf-8")


def _complete_line(line: str) -> dict[str, Any] | None:
    """A journal entry, or None for an empty line or one cut short when the double was killed."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) else None


@dataclass
class WeComDoubleState:
    """Everything the double remembers; all access under `lock`."""

    corp_id: str
    secret: str
    agent_id: str = ""
    token_ttl: int = 7200
    fault_ip: str = DEFAULT_FAULT_IP
    rate_limits: tuple[tuple[int, float], ...] = DEFAULT_RATE_LIMITS
    clock: Callable[[], float] = time.monotonic
    lock: threading.Lock = field(default_factory=threading.Lock)
    messages: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    gettoken_calls: int = 0
    send_calls: int = 0
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (clock time)
    faults: dict[str, deque[int]] = field(default_factory=dict)
    # Userids WeCom does not know: reported in `invaliduser`; only unknown ones → 81013.
    unknown_users: set[str] = field(default_factory=set)
    # Userids without an interface licence (接口许可): reported in `unlicenseduser`, not delivered.
    unlicensed_users: set[str] = field(default_factory=set)
    # Requests enable_duplicate_check kept from being delivered a second time.
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    _duplicate_keys: dict[str, tuple[float, str]] = field(default_factory=dict)
    # Where the chat page's messages go; None: the page cannot send (409).
    chat_callback: ChatCallback | None = None
    journal: Journal | None = None
    _sent_at: dict[str, deque[float]] = field(default_factory=dict)
    _msg_seq: int = 0
    # media/upload: media_id -> {type, filename, content_type, data, created_at (epoch)}
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    upload_calls: int = 0

    def __post_init__(self) -> None:
        # Wakes long-polling readers of /_double/messages when a message is recorded.
        self.recorded = threading.Condition(self.lock)
        if self.journal is not None:
            for entry in self.journal.entries():
                self._replay(entry)
            self.journal.rewrite(self._journal_entries())

    def _replay(self, entry: dict[str, Any]) -> None:
        kind = entry["kind"]
        if kind == "token":
            expiry = float("-inf") if entry.get("expired") else self.clock() + self.token_ttl
            self.tokens[entry["token"]] = expiry
        elif kind in ("message", "dropped"):
            (self.messages if kind == "message" else self.dropped).append(entry["record"])
            self._msg_seq += 1
        elif kind == "expire-tokens":
            self.tokens = dict.fromkeys(self.tokens, float("-inf"))
        elif kind in ("clear", "reset"):
            self.messages.clear()
            self.dropped.clear()

    def _journal_entries(self) -> list[dict[str, Any]]:
        """The state as journal entries: tokens (expired ones kept, they answer 42001), then
        records. A replayed token's lifetime starts again, as after the double's restart."""
        now = self.clock()
        entries: list[dict[str, Any]] = [
            {"kind": "token", "token": token, **({"expired": True} if expiry <= now else {})}
            for token, expiry in self.tokens.items()
        ]
        entries += [{"kind": "dropped", "record": record} for record in self.dropped]
        entries += [{"kind": "message", "record": record} for record in self.messages]
        return entries

    def _log(self, kind: str, **fields: Any) -> None:
        if self.journal is not None:
            self.journal.append({"kind": kind, **fields})

    def fail_next(self, api: str, *errcodes: int) -> None:
        """The next calls of `api` ("gettoken" or "send") answer these errcodes, one per call."""
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        with self.lock:
            self.faults.setdefault(api, deque()).extend(int(code) for code in errcodes)

    def set_unknown_users(self, *users: str) -> None:
        with self.lock:
            self.unknown_users = set(users)

    def set_unlicensed_users(self, *users: str) -> None:
        with self.lock:
            self.unlicensed_users = set(users)

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired (the next use gets 42001)."""
        with self.lock:
            self.tokens = dict.fromkeys(self.tokens, float("-inf"))
            self._log("expire-tokens")

    def clear_messages(self) -> None:
        with self.lock:
            self.messages.clear()
            self.dropped.clear()
            self._sent_at.clear()
            self._log("clear")

    def reset(self) -> None:
        """Forget messages, faults and counters; issued tokens stay valid."""
        with self.lock:
            self.messages.clear()
            self.dropped.clear()
            self._sent_at.clear()
            self.faults.clear()
            self.gettoken_calls = 0
            self.send_calls = 0
            self.upload_calls = 0
            self.uploads.clear()
            self._log("reset")

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(m) for m in self.messages]

    def messages_for(
        self, user: str | None = None, after: float = 0.0, wait: float = 0.0
    ) -> list[dict[str, Any]]:
        """Messages to `user` (all when None) recorded after `after` (the double's time.time()),
        waiting up to `wait` seconds for the first one (long polling)."""

        def matching() -> list[dict[str, Any]]:
            return [
                dict(m)
                for m in self.messages
                if m["received_at"] > after
                and (user is None or user in str(m.get("touser", "")).split("|"))
            ]

        with self.lock:
            self.recorded.wait_for(matching, timeout=max(0.0, min(wait, MAX_WAIT)))
            return matching()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "gettoken_calls": self.gettoken_calls,
                "send_calls": self.send_calls,
                "messages": len(self.messages),
                "dropped": len(self.dropped),
                "dropped_messages": [dict(m) for m in self.dropped],
                "tokens_issued": len(self.tokens),
                "pending_faults": {api: list(codes) for api, codes in self.faults.items()},
            }

    # --- used by the routes, lock held ------------------------------------------------------

    def take_fault(self, api: str) -> int | None:
        queue = self.faults.get(api)
        return queue.popleft() if queue else None

    def token_error(self, token: str | None) -> int | None:
        if not token:
            return 41001
        expiry = self.tokens.get(token)
        if expiry is None:
            return 40014
        return 42001 if self.clock() >= expiry else None

    def issue_token(self) -> tuple[str, int]:
        """gettoken's token and its seconds left: the same token while it is valid (WeCom
        hands out the current one; a new one only after it expired or was invalidated)."""
        now = self.clock()
        valid = [(expiry, token) for token, expiry in self.tokens.items() if expiry > now]
        if valid:
            expiry, token = max(valid)
            return token, int(expiry - now)
        token = secrets.token_urlsafe(96)
        self.tokens[token] = now + self.token_ttl
        self._log("token", token=token)
        return token, self.token_ttl

    def duplicate_of(self, body: dict[str, Any]) -> str | None:
        """With enable_duplicate_check=1: the msgid of the same request JSON sent within
        duplicate_check_interval seconds (WeCom does not deliver it again), else None."""
        if str(body.get("enable_duplicate_check", 0)) not in ("1", "true", "True"):
            return None
        try:
            interval = float(body.get("duplicate_check_interval") or 1800)
        except (TypeError, ValueError):
            interval = 1800.0
        key = json.dumps(body, sort_keys=True, ensure_ascii=False)
        now = self.clock()
        seen = self._duplicate_keys.get(key)
        if seen is not None and now - seen[0] < interval:
            return seen[1]
        return None

    def remember_request(self, body: dict[str, Any], msgid: str) -> None:
        if str(body.get("enable_duplicate_check", 0)) in ("1", "true", "True"):
            key = json.dumps(body, sort_keys=True, ensure_ascii=False)
            self._duplicate_keys[key] = (self.clock(), msgid)

    def admit(self, user: str) -> bool:
        """Whether WeCom would deliver one more message to `user` now (per-member limits)."""
        now = self.clock()
        longest = max(window for _, window in self.rate_limits)
        sent = self._sent_at.setdefault(user, deque())
        while sent and sent[0] <= now - longest:
            sent.popleft()
        for count, window in self.rate_limits:
            if sum(1 for at in sent if at > now - window) >= count:
                return False
        sent.append(now)
        return True

    def next_msgid(self) -> str:
        self._msg_seq += 1
        return f"double-{self._msg_seq:08d}-{secrets.token_hex(6)}"


def _error(state: WeComDoubleState, errcode: int) -> Response:
    return jsonify({"errcode": errcode, "errmsg": errmsg(errcode, state.fault_ip)})


def create_wecom_double(
    *,
    corp_id: str,
    secret: str,
    agent_id: str = "",
    token_ttl: int = 7200,
    fault_ip: str = DEFAULT_FAULT_IP,
    rate_limits: tuple[tuple[int, float], ...] = DEFAULT_RATE_LIMITS,
    clock: Callable[[], float] = time.monotonic,
    chat_callback: ChatCallback | None = None,
    journal: Path | None = None,
    kf: KfDoubleState | None = None,
) -> Flask:
    """`kf`: also play 微信客服 (testing/kf_double.py), with the kf secret's own token."""
    state = WeComDoubleState(
        corp_id=corp_id,
        secret=secret,
        agent_id=agent_id,
        token_ttl=token_ttl,
        fault_ip=fault_ip,
        rate_limits=rate_limits,
        clock=clock,
        chat_callback=chat_callback,
        journal=Journal(journal) if journal else None,
    )
    app = Flask("wecom_double")
    app.extensions["wecom_double"] = state

    @app.get("/cgi-bin/gettoken")
    def gettoken() -> Response:
        with state.lock:
            state.gettoken_calls += 1
            fault = state.take_fault("gettoken")
            if fault is not None:
                return _error(state, fault)
            if request.args.get("corpid") != state.corp_id:
                return _error(state, 40013)
            corpsecret = request.args.get("corpsecret", "")
            if kf is not None and secrets.compare_digest(corpsecret, kf.secret):
                with kf.lock:
                    token, expires_in = kf.issue_token()
            elif not secrets.compare_digest(corpsecret, state.secret):
                return _error(state, 40001)
            else:
                token, expires_in = state.issue_token()
        return jsonify(
            {"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": expires_in}
        )

    @app.post("/cgi-bin/message/send")
    def message_send() -> Response:
        body = request.get_json(force=True, silent=True)
        with state.lock:
            state.send_calls += 1
            problem = state.token_error(request.args.get("access_token"))
            if problem is None:
                problem = state.take_fault("send")
            if problem is None:
                problem = _check_send(state, body)
            if problem is not None or not isinstance(body, dict):
                return _error(state, problem or 47001)
            return jsonify(_record_send(state, body))

    @app.post("/cgi-bin/media/upload")
    def media_upload() -> Response:
        media = request.files.get("media")
        data = media.read() if media is not None else b""
        with state.lock:
            state.upload_calls += 1
            problem = state.token_error(request.args.get("access_token"))
            if problem is None:
                problem = state.take_fault("upload")
            kind = request.args.get("type", "")
            if problem is None:
                problem = _check_upload(kind, data)
            if problem is not None:
                return _error(state, problem)
            media_id = f"{kind[:1]}{secrets.token_hex(16)}"
            created_at = int(time.time())
            state.uploads[media_id] = {
                "type": kind,
                "filename": (media.filename if media is not None else "") or "media",
                "content_type": media.mimetype if media is not None else "",
                "data": data,
                "created_at": created_at,
            }
        return jsonify(
            {
                "errcode": 0,
                "errmsg": "ok",
                "type": kind,
                "media_id": media_id,
                "created_at": str(created_at),
            }
        )

    @app.get("/cgi-bin/getcallbackip")
    def getcallbackip() -> Response:
        with state.lock:
            problem = state.token_error(request.args.get("access_token"))
            if problem is None:
                problem = state.take_fault("getcallbackip")
        if problem is not None:
            return _error(state, problem)
        return jsonify({"errcode": 0, "errmsg": "ok", "ip_list": ["203.0.113.10", "203.0.113.11"]})

    _control_routes(app, state)
    _chat_routes(app, state)
    _media_routes(app, state)
    if kf is not None:
        mount_kf(app, kf, lambda errcode: errmsg(errcode, state.fault_ip))
    return app


def _check_upload(kind: str, data: bytes) -> int | None:
    """media/upload's checks (doc 90389): the type, more than 5 bytes, each type's limit and
    format (an image is JPG/PNG, a voice AMR)."""
    if kind not in UPLOAD_LIMITS:
        return 40005
    if not data:
        return 44001
    if len(data) <= 5:
        return 40006
    if len(data) > UPLOAD_LIMITS[kind]:
        return {"image": 40009, "video": 40011}.get(kind, 40006)
    if kind == "image" and not data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
        return 40004
    if kind == "voice" and not data.startswith(b"#!AMR"):
        return 40004
    return None


def _check_media(state: WeComDoubleState, body: Any) -> int | None:
    """An image/file/voice/video message names a media_id WeCom knows (for 3 days)."""
    media_id = body.get("media_id") if isinstance(body, dict) else None
    upload = state.uploads.get(media_id) if isinstance(media_id, str) else None
    if upload is None or time.time() - upload["created_at"] > MEDIA_ID_LIFETIME:
        return 40007
    return None


def _media_routes(app: Flask, state: WeComDoubleState) -> None:
    """media/get of what members sent (testing/media_double.py)."""
    shelf = MediaShelf()
    app.extensions["wecom_media"] = shelf

    def token_error(token: str) -> int | None:
        with state.lock:
            return state.token_error(token)

    mount_media_get(app, shelf, token_error)


def _check_send(state: WeComDoubleState, body: Any) -> int | None:
    if not isinstance(body, dict):
        return 47001
    msgtype = body.get("msgtype")
    if msgtype in UPLOAD_LIMITS:
        problem = _check_media(state, body.get(msgtype))
        if problem is not None:
            return problem
        return _check_recipients(state, body)
    content = (body.get(msgtype) or {}).get("content") if isinstance(msgtype, str) else None
    if msgtype not in ("text", "markdown") or not isinstance(content, str):
        return 47001
    if not content:
        return 44004
    return _check_recipients(state, body)


def _check_recipients(state: WeComDoubleState, body: dict[str, Any]) -> int | None:
    if state.agent_id and str(body.get("agentid")) != state.agent_id:
        return 40056
    if not (body.get("touser") or body.get("toparty") or body.get("totag")):
        return 81013
    users = [u for u in str(body.get("touser", "")).split("|") if u]
    known = [u for u in users if u not in state.unknown_users]
    if users and not known and not (body.get("toparty") or body.get("totag")):
        return 81013
    return None


def _record_send(state: WeComDoubleState, body: dict[str, Any]) -> dict[str, Any]:
    """Store what a member would see; the rate limit drops silently, as WeCom does."""
    record = {**body, "received_at": time.time()}
    msgtype = body["msgtype"]
    content = str(body[msgtype].get("content", ""))
    upload = state.uploads.get(str(body[msgtype].get("media_id", "")))
    if upload is not None:  # what the member sees of a file: its name and size
        record["media"] = {
            "type": upload["type"],
            "filename": upload["filename"],
            "bytes": len(upload["data"]),
        }
    size = len(content.encode("utf-8"))
    if size > TEXT_LIMIT:
        record[msgtype] = {**body[msgtype], "content": _truncate(content, TEXT_LIMIT)}
        record["truncated"] = True
        record["content_bytes"] = size
    all_users = [u for u in str(body.get("touser", "")).split("|") if u]
    invalid = [u for u in all_users if u in state.unknown_users]
    unlicensed = [u for u in all_users if u in state.unlicensed_users and u not in invalid]
    users = [u for u in all_users if u not in state.unknown_users and u not in unlicensed]
    duplicate = state.duplicate_of(body)
    if duplicate is not None:  # the same request within the interval: not delivered again
        record["msgid"] = duplicate
        state.duplicates.append(record)
        return {"errcode": 0, "errmsg": "ok", "invaliduser": "", "msgid": duplicate}
    refused = [u for u in users if not state.admit(u)]
    record["msgid"] = state.next_msgid()
    state.remember_request(body, record["msgid"])
    if unlicensed:
        record["unlicensed_users"] = unlicensed
    if (not users and unlicensed) or (
        users and len(refused) == len(users)
    ):  # nobody with an interface licence: nothing delivered
        state.dropped.append(record)
        state._log("dropped", record=record)
    else:
        if refused:
            record["dropped_users"] = refused
        state.messages.append(record)
        state._log("message", record=record)
        state.recorded.notify_all()
    return {
        "errcode": 0,
        "errmsg": "ok",
        "invaliduser": "|".join(invalid),
        **({"unlicenseduser": "|".join(unlicensed)} if unlicensed else {}),
        "msgid": record["msgid"],
    }


def _control_routes(app: Flask, state: WeComDoubleState) -> None:
    @app.get("/_double/uploads/<media_id>")
    def uploaded(media_id: str) -> Response | tuple[Response, int]:
        """An uploaded file's bytes (the chat page shows images the member received)."""
        with state.lock:
            upload = state.uploads.get(media_id)
        if upload is None:
            return jsonify({"error": "no such media_id"}), 404
        return Response(upload["data"], mimetype=upload["content_type"] or None)

    @app.get("/_double/messages")
    def list_messages() -> Response | tuple[Response, int]:
        """All messages; `?user=U&after=T&wait=S` filters and long-polls (chat page, simulator)."""
        try:
            after = float(request.args.get("after", 0) or 0)
            wait = float(request.args.get("wait", 0) or 0)
        except ValueError:
            return jsonify({"error": "after and wait must be numbers"}), 400
        user = request.args.get("user") or None
        return jsonify({"messages": state.messages_for(user, after, wait)})

    @app.delete("/_double/messages")
    def clear_messages() -> Response:
        state.clear_messages()
        return jsonify({"ok": True})

    @app.post("/_double/faults")
    def add_faults() -> Response | tuple[Response, int]:
        spec = request.get_json(force=True, silent=True) or {}
        unknown = sorted(set(spec) - set(APIS))
        if unknown:
            return jsonify({"error": f"unknown apis {unknown}; use {list(APIS)}"}), 400
        for api, codes in spec.items():
            state.fail_next(api, *codes)
        return jsonify({"ok": True})

    @app.post("/_double/expire-tokens")
    def expire_tokens() -> Response:
        state.expire_tokens()
        return jsonify({"ok": True})

    @app.post("/_double/reset")
    def reset() -> Response:
        state.reset()
        return jsonify({"ok": True})

    @app.get("/_double/stats")
    def stats() -> Response:
        return jsonify(state.stats())


@dataclass(frozen=True)
class ChatCallback:
    """Where the chat page's messages go: the bridge's callback URL and the app's crypto."""

    url: str
    token: str = field(repr=False)
    encoding_aes_key: str = field(repr=False)
    verify: bool | str = True  # False: accept any certificate; a path: trust that CA bundle

    def client(self, corp_id: str, agent_id: str) -> CallbackClient:
        crypto = WeComCrypto(self.token, self.encoding_aes_key, corp_id)
        return CallbackClient(self.url, crypto, agent_id, verify=self.verify, timeout=10.0)


def chat_page() -> str:
    return (resources.files("wecom_bridge.testing") / "static" / "chat.html").read_text("utf-8")


def _chat_routes(app: Flask, state: WeComDoubleState) -> None:
    @app.get("/_double/chat")
    def chat() -> Response:
        return Response(chat_page(), mimetype="text/html")

    @app.post("/_double/chat/send")
    def chat_send() -> tuple[Response, int]:
        """{user, text} or {user, event}: to the bridge as WeCom sends it, signed and encrypted."""
        callback = state.chat_callback
        if callback is None:
            return jsonify({"error": "no callback URL: set WECOM_DOUBLE_CALLBACK_URL"}), 409
        spec = request.get_json(force=True, silent=True) or {}
        user, text, event = (str(spec.get(k, "")).strip() for k in ("user", "text", "event"))
        if not user or not (text or event):
            return jsonify({"error": "user and text (or event) are required"}), 400
        client = callback.client(state.corp_id, state.agent_id)
        sent_at = time.time()
        try:
            answer = client.send_event(user, event) if event else client.send_text(user, text)
        except requests.RequestException as exc:
            problem = f"callback to {callback.url} failed: {type(exc).__name__}"
            return jsonify({"error": problem}), 502
        result = {"status": answer.status_code, "body": answer.text[:200], "sent_at": sent_at}
        return jsonify(result), 200


def _verify_setting(raw: str) -> bool | str:
    if raw.lower() in ("", "1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    return raw  # a CA bundle


def wecom_double_from_env(callback_url: str | None = None) -> Flask:
    """The double configured like the bridge: WECOM_CORP_ID, WECOM_SECRET, WECOM_AGENT_ID.

    The chat page needs WECOM_DOUBLE_CALLBACK_URL (or `callback_url`) and WECOM_TOKEN,
    WECOM_ENCODING_AES_KEY; WECOM_DOUBLE_CALLBACK_VERIFY=false|<CA file> for test certificates.
    WECOM_DOUBLE_JOURNAL=<file>: remember messages and tokens across restarts.
    """
    url = callback_url or os.environ.get("WECOM_DOUBLE_CALLBACK_URL", "")
    chat_callback = (
        ChatCallback(
            url=url,
            token=required_env("WECOM_TOKEN"),
            encoding_aes_key=required_env("WECOM_ENCODING_AES_KEY"),
            verify=_verify_setting(os.environ.get("WECOM_DOUBLE_CALLBACK_VERIFY", "")),
        )
        if url
        else None
    )
    return create_wecom_double(
        corp_id=required_env("WECOM_CORP_ID"),
        secret=required_env("WECOM_SECRET"),
        agent_id=os.environ.get("WECOM_AGENT_ID", ""),
        chat_callback=chat_callback,
        journal=Path(journal) if (journal := os.environ.get("WECOM_DOUBLE_JOURNAL")) else None,
        kf=kf_double_from_env(),
    )


def kf_double_from_env() -> KfDoubleState | None:
    """微信客服 too when WECOM_KF_SECRET is set; its callback goes to WECOM_DOUBLE_KF_CALLBACK_URL
    (with WECOM_KF_TOKEN, WECOM_KF_ENCODING_AES_KEY); WECOM_DOUBLE_KF_ACCOUNTS: open_kfids."""
    secret = os.environ.get("WECOM_KF_SECRET", "")
    if not secret:
        return None
    url = os.environ.get("WECOM_DOUBLE_KF_CALLBACK_URL", "")
    callback = (
        KfCallback(
            url=url,
            token=required_env("WECOM_KF_TOKEN"),
            encoding_aes_key=required_env("WECOM_KF_ENCODING_AES_KEY"),
            verify=_verify_setting(os.environ.get("WECOM_DOUBLE_CALLBACK_VERIFY", "")),
        )
        if url
        else None
    )
    accounts = tuple(
        a.strip() for a in os.environ.get("WECOM_DOUBLE_KF_ACCOUNTS", "").split(",") if a.strip()
    )
    return KfDoubleState(
        corp_id=required_env("WECOM_CORP_ID"),
        secret=secret,
        accounts=accounts or (DEFAULT_ACCOUNT,),
        callback=callback,
    )
