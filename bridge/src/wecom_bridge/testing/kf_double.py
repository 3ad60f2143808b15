"""The 微信客服 (kf) part of the WeCom double: customers, sessions and the kf API.

Mounted by the WeCom double (one double): gettoken with the kf secret issues the kf's own access
token, and the kf routes accept only that one. What it plays, from WeCom's docs:
- a customer's message is kept in the kf account's message log and signalled by a signed,
  encrypted `kf_msg_or_event` callback with a one-time Token (valid 10 minutes) — no content;
- kf/sync_msg (doc 94670) pages through the log from a cursor (none: the last three days), at
  most `limit` (≤ 1000) a page, `has_more` while more wait; a Token, when given, must be valid;
- kf/send_msg (doc 94677) only while the session is new (0) or the bot's (1), and at most 5
  messages within 48 hours of the customer's last message: else 95018 / 95001;
- send_msg_on_event with an enter_session event's welcome_code: once, within 20 seconds;
- service_state/get and /trans (doc 94698) with WeCom's allowed transitions; a human servicer
  takes and ends sessions through the control API, as a servicer in the WeCom client would.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
from flask import Flask, Response, jsonify, request

from wecom_bridge.testing.callbacks import build_callback
from wecom_bridge.wecom.crypto import WeComCrypto

HISTORY_SECONDS = 3 * 86400  # sync_msg without a cursor starts this far back
PULL_TOKEN_SECONDS = 600.0
WELCOME_CODE_SECONDS = 20.0
WINDOW_SECONDS = 48 * 3600.0
WINDOW_MESSAGES = 5
TEXT_LIMIT = 2048
MAX_LIMIT = 1000
KF_APIS = ("sync_msg", "send_msg", "send_msg_on_event", "service_state")
DEFAULT_ACCOUNT = "wkDOUBLEkf000001"
# service_state/trans: from each state, the states WeCom allows (doc 94698).
TRANSITIONS = {0: {1, 2, 3, 4}, 1: {1, 2, 3, 4}, 2: {2, 3, 4}, 3: {3, 4}, 4: set[int]()}
KF_ERRMSGS = {
    95000: "invalid open_kfid",
    95001: "send msg count limit",
    95007: "invalid msg token",
    95016: "not allow this service state transfer",
    95018: "send msg session status invalid",
    40058: "invalid parameter",
}


@dataclass(frozen=True)
class KfCallback:
    """Where the kf callback goes: the bridge's kf callback URL and the kf's crypto."""

    url: str
    token: str = field(repr=False)
    encoding_aes_key: str = field(repr=False)
    verify: bool | str = True


@dataclass
class KfSession:
    state: int = 4
    servicer: str = ""
    last_customer_at: float | None = None
    sent_since: int = 0  # messages sent to the customer since their last message


@dataclass
class KfDoubleState:
    """Everything the kf double remembers; all access under `lock`."""

    corp_id: str
    secret: str
    accounts: tuple[str, ...] = (DEFAULT_ACCOUNT,)
    page_size: int = MAX_LIMIT  # WeCom may return fewer than `limit`: tests page with less
    token_ttl: int = 7200
    callback: KfCallback | None = None
    clock: Callable[[], float] = time.time  # send_time is Unix time
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: dict[str, float] = field(default_factory=dict)  # access token -> expiry
    pull_tokens: dict[str, float] = field(default_factory=dict)  # callback Token -> expiry
    log: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per open_kfid
    sessions: dict[tuple[str, str], KfSession] = field(default_factory=dict)
    sent: list[dict[str, Any]] = field(default_factory=list)  # what customers received
    refused: list[dict[str, Any]] = field(default_factory=list)  # sends WeCom refused
    welcome_codes: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    faults: dict[str, deque[int]] = field(default_factory=dict)
    sync_calls: int = 0
    sync_calls_without_token: int = 0
    _seq: int = 0

    def __post_init__(self) -> None:
        self.recorded = threading.Condition(self.lock)

    # --- tokens ---------------------------------------------------------------------------------

    def issue_token(self) -> tuple[str, int]:
        now = time.monotonic()
        valid = [(expiry, token) for token, expiry in self.tokens.items() if expiry > now]
        if valid:
            expiry, token = max(valid)
            return token, int(expiry - now)
        token = secrets.token_urlsafe(64)
        self.tokens[token] = now + self.token_ttl
        return token, self.token_ttl

    def token_error(self, token: str | None) -> int | None:
        if not token:
            return 41001
        expiry = self.tokens.get(token)
        if expiry is None:
            return 40014
        return 42001 if time.monotonic() >= expiry else None

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens = dict.fromkeys(self.tokens, float("-inf"))

    def fail_next(self, api: str, *errcodes: int) -> None:
        if api not in KF_APIS:
            raise ValueError(f"api must be one of {KF_APIS}, got {api!r}")
        with self.lock:
            self.faults.setdefault(api, deque()).extend(int(c) for c in errcodes)

    def take_fault(self, api: str) -> int | None:
        """The errcode this call answers; a queued 0 lets one call through (to fail a later one)."""
        queue = self.faults.get(api)
        return (queue.popleft() or None) if queue else None

    # --- what customers and servicers do (control side) --------------------------------------

    def _append(self, kfid: str, entry: dict[str, Any]) -> dict[str, Any]:
        self._seq += 1
        entry = {"msgid": f"kfmsg{self._seq:08d}{secrets.token_hex(4)}", **entry}
        self.log.setdefault(kfid, []).append(entry)
        return entry

    def _session(self, kfid: str, user: str) -> KfSession:
        return self.sessions.setdefault((kfid, user), KfSession())

    def _account(self, kfid: str | None) -> str:
        return kfid or self.accounts[0]

    def customer_says(
        self, user: str, text: str, kfid: str | None = None, msgtype: str = "text"
    ) -> tuple[str, str]:
        """A customer's message: (its msgid, the callback's pull Token)."""
        kfid = self._account(kfid)
        now = self.clock()
        with self.lock:
            body: dict[str, Any] = {"text": {"content": text}} if msgtype == "text" else {}
            if msgtype != "text":
                body = {msgtype: {"media_id": f"media-{secrets.token_hex(4)}"}}
            entry = self._append(
                kfid,
                {
                    "open_kfid": kfid,
                    "external_userid": user,
                    "send_time": int(now),
                    "origin": 3,
                    "msgtype": msgtype,
                    **body,
                },
            )
            session = self._session(kfid, user)
            if session.state == 4:
                session.state = 0  # the customer's message opens a new session
            session.last_customer_at = now
            session.sent_since = 0
            return entry["msgid"], self._pull_token()

    def customer_enters(self, user: str, kfid: str | None = None) -> tuple[str, str]:
        """The customer opens the chat (enter_session): (the welcome_code, the pull Token)."""
        kfid = self._account(kfid)
        with self.lock:
            code = secrets.token_urlsafe(16)
            self.welcome_codes[code] = (kfid, user, self.clock() + WELCOME_CODE_SECONDS)
            self._event(kfid, user, "enter_session", scene="", welcome_code=code)
            return code, self._pull_token()

    def servicer_action(
        self,
        user: str,
        action: str,
        servicer: str = "servicer01",
        text: str = "",
        kfid: str | None = None,
    ) -> str:
        """A human servicer takes, ends or answers a session (their WeCom client); the Token."""
        kfid = self._account(kfid)
        with self.lock:
            session = self._session(kfid, user)
            if action == "take":
                session.state, session.servicer = 3, servicer
                self._event(kfid, user, "session_status_change", change_type=1)
            elif action == "end":
                session.state, session.servicer = 4, ""
                self._event(kfid, user, "session_status_change", change_type=3)
            elif action == "say":
                self._append(
                    kfid,
                    {
                        "open_kfid": kfid,
                        "external_userid": user,
                        "send_time": int(self.clock()),
                        "origin": 5,
                        "servicer_userid": servicer,
                        "msgtype": "text",
                        "text": {"content": text},
                    },
                )
            else:
                raise ValueError(f"action must be take, end or say, got {action!r}")
            return self._pull_token()

    def _event(self, kfid: str, user: str, event_type: str, **fields: Any) -> None:
        event = {"event_type": event_type, "open_kfid": kfid, "external_userid": user, **fields}
        self._append(
            kfid, {"send_time": int(self.clock()), "origin": 4, "msgtype": "event", "event": event}
        )

    def _pull_token(self) -> str:
        token = "ENC" + secrets.token_urlsafe(32)
        self.pull_tokens[token] = self.clock() + PULL_TOKEN_SECONDS
        return token

    def signal(self, kfid: str | None, token: str) -> int | None:
        """POST the kf callback for `token` to the bridge; its HTTP status (None: no callback
        configured). Called without the lock: the bridge answers while the double serves."""
        callback = self.callback
        if callback is None:
            return None
        crypto = WeComCrypto(callback.token, callback.encoding_aes_key, self.corp_id)
        fields: dict[str, str | int] = {
            "ToUserName": self.corp_id,
            "CreateTime": int(self.clock()),
            "MsgType": "event",
            "Event": "kf_msg_or_event",
            "Token": token,
            "OpenKfId": self._account(kfid),
        }
        params, body = build_callback(crypto, fields)
        try:
            answer = requests.post(
                callback.url,
                params=params,
                data=body,
                headers={"Content-Type": "text/xml; charset=utf-8"},
                verify=callback.verify,
                timeout=10.0,
            )
        except requests.RequestException:
            return 0
        return answer.status_code

    def sent_to(self, user: str | None, after: float, wait: float) -> list[dict[str, Any]]:
        def matching() -> list[dict[str, Any]]:
            return [
                dict(m)
                for m in self.sent
                if m["received_at"] > after and (user is None or m.get("touser") == user)
            ]

        with self.lock:
            self.recorded.wait_for(matching, timeout=max(0.0, min(wait, 30.0)))
            return matching()

    def session_of(self, user: str, kfid: str | None = None) -> KfSession:
        with self.lock:
            return self._session(self._account(kfid), user)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "sync_calls": self.sync_calls,
                "sync_calls_without_token": self.sync_calls_without_token,
                "sent": len(self.sent),
                "refused": [dict(r) for r in self.refused],
                "sessions": {
                    f"{kfid}:{user}": {"state": s.state, "servicer": s.servicer}
                    for (kfid, user), s in self.sessions.items()
                },
            }

    def reset(self) -> None:
        with self.lock:
            self.log.clear()
            self.sessions.clear()
            self.sent.clear()
            self.refused.clear()
            self.welcome_codes.clear()
            self.faults.clear()
            self.sync_calls = self.sync_calls_without_token = 0

    # --- the API (lock held) ------------------------------------------------------------------

    def sync(self, body: dict[str, Any]) -> dict[str, Any] | int:
        self.sync_calls += 1
        kfid = str(body.get("open_kfid", ""))
        if kfid and kfid not in self.accounts:
            return 95000
        token = str(body.get("token", "") or "")
        if token:
            expiry = self.pull_tokens.get(token)
            if expiry is None or self.clock() >= expiry:
                return 95007
        else:
            self.sync_calls_without_token += 1
        try:
            limit = min(int(body.get("limit", MAX_LIMIT) or MAX_LIMIT), MAX_LIMIT, self.page_size)
        except (TypeError, ValueError):
            return 40058
        kfids = [kfid] if kfid else list(self.accounts)
        entries = [e for k in kfids for e in self.log.get(k, [])]
        cursor = str(body.get("cursor", "") or "")
        start = self._position(entries, cursor)
        if start is None:
            return 40058
        page = entries[start : start + limit]
        end = start + len(page)
        return {
            "errcode": 0,
            "errmsg": "ok",
            "next_cursor": f"cur{end:08d}{secrets.token_hex(2)}",
            "has_more": 1 if end < len(entries) else 0,
            "msg_list": [dict(e) for e in page],
        }

    def _position(self, entries: list[dict[str, Any]], cursor: str) -> int | None:
        if not cursor:
            oldest = self.clock() - HISTORY_SECONDS
            return next(
                (i for i, e in enumerate(entries) if e["send_time"] >= oldest), len(entries)
            )
        digits = cursor[3:11]
        if not cursor.startswith("cur") or not digits.isdigit():
            return None
        return min(int(digits), len(entries))

    def send(self, body: dict[str, Any]) -> dict[str, Any] | int:
        kfid, user = str(body.get("open_kfid", "")), str(body.get("touser", ""))
        content = (body.get("text") or {}).get("content") if body.get("msgtype") == "text" else None
        if not isinstance(content, str) or not user:
            return 47001
        if not content:
            return 44004
        if kfid not in self.accounts:
            return 95000
        session = self._session(kfid, user)
        if session.state not in (0, 1):
            return self._refuse(body, 95018)
        if (
            session.last_customer_at is None
            or self.clock() - session.last_customer_at > WINDOW_SECONDS
            or session.sent_since >= WINDOW_MESSAGES
        ):
            return self._refuse(body, 95001)
        session.sent_since += 1
        session.state = 1  # answered through the API: the bot has the session
        return self._record(body, content)

    def send_on_event(self, body: dict[str, Any]) -> dict[str, Any] | int:
        code = str(body.get("code", ""))
        content = (body.get("text") or {}).get("content") if body.get("msgtype") == "text" else None
        if not isinstance(content, str) or not content:
            return 47001
        found = self.welcome_codes.pop(code, None)  # usable once
        if found is None or self.clock() > found[2]:
            return 40058
        kfid, user, _ = found
        return self._record({**body, "open_kfid": kfid, "touser": user, "welcome": True}, content)

    def _record(self, body: dict[str, Any], content: str) -> dict[str, Any]:
        self._seq += 1
        msgid = f"kfsent{self._seq:08d}"
        truncated = content.encode("utf-8")[:TEXT_LIMIT].decode("utf-8", "ignore")
        self.sent.append(
            {**body, "text": {"content": truncated}, "msgid": msgid, "received_at": time.time()}
        )
        self.recorded.notify_all()
        return {"errcode": 0, "errmsg": "ok", "msgid": msgid}

    def _refuse(self, body: dict[str, Any], errcode: int) -> int:
        self.refused.append({**body, "errcode": errcode, "at": time.time()})
        return errcode

    def state_get(self, body: dict[str, Any]) -> dict[str, Any] | int:
        kfid, user = str(body.get("open_kfid", "")), str(body.get("external_userid", ""))
        if kfid not in self.accounts:
            return 95000
        session = self._session(kfid, user)
        return {
            "errcode": 0,
            "errmsg": "ok",
            "service_state": session.state,
            "servicer_userid": session.servicer if session.state == 3 else "",
        }

    def state_trans(self, body: dict[str, Any]) -> dict[str, Any] | int:
        kfid, user = str(body.get("open_kfid", "")), str(body.get("external_userid", ""))
        if kfid not in self.accounts:
            return 95000
        try:
            target = int(body.get("service_state", -1))
        except (TypeError, ValueError):
            return 40058
        session = self._session(kfid, user)
        if target not in TRANSITIONS[session.state]:
            return 95016
        servicer = str(body.get("servicer_userid", "") or "")
        if target == 3 and not servicer:
            return 40058
        session.state, session.servicer = target, servicer if target == 3 else ""
        return {"errcode": 0, "errmsg": "ok"}


def _answer(result: dict[str, Any] | int, errmsg: Callable[[int], str]) -> Response:
    if isinstance(result, int):
        return jsonify({"errcode": result, "errmsg": errmsg(result)})
    return jsonify(result)


def mount_kf(app: Flask, kf: KfDoubleState, errmsg: Callable[[int], str]) -> None:
    """The kf API and its control routes on the WeCom double's app."""
    app.extensions["kf_double"] = kf

    def call(api: str, handler: Callable[[dict[str, Any]], dict[str, Any] | int]) -> Response:
        body = request.get_json(force=True, silent=True)
        with kf.lock:
            problem = kf.token_error(request.args.get("access_token"))
            if problem is None:
                problem = kf.take_fault(api)
            if problem is not None:
                return _answer(problem, errmsg)
            if not isinstance(body, dict):
                return _answer(47001, errmsg)
            return _answer(handler(body), errmsg)

    app.add_url_rule(
        "/cgi-bin/kf/sync_msg", "kf_sync_msg", lambda: call("sync_msg", kf.sync), methods=["POST"]
    )
    app.add_url_rule(
        "/cgi-bin/kf/send_msg", "kf_send_msg", lambda: call("send_msg", kf.send), methods=["POST"]
    )
    app.add_url_rule(
        "/cgi-bin/kf/send_msg_on_event",
        "kf_send_msg_on_event",
        lambda: call("send_msg_on_event", kf.send_on_event),
        methods=["POST"],
    )
    app.add_url_rule(
        "/cgi-bin/kf/service_state/get",
        "kf_state_get",
        lambda: call("service_state", kf.state_get),
        methods=["POST"],
    )
    app.add_url_rule(
        "/cgi-bin/kf/service_state/trans",
        "kf_state_trans",
        lambda: call("service_state", kf.state_trans),
        methods=["POST"],
    )

    def accounts(body: dict[str, Any]) -> dict[str, Any]:
        listed = [{"open_kfid": k, "name": k, "manage_privilege": True} for k in kf.accounts]
        return {"errcode": 0, "errmsg": "ok", "account_list": listed}

    app.add_url_rule(
        "/cgi-bin/kf/account/list",
        "kf_account_list",
        lambda: call("service_state", accounts),
        methods=["POST"],
    )
    _kf_control_routes(app, kf)


def _kf_control_routes(app: Flask, kf: KfDoubleState) -> None:
    @app.post("/_double/kf/customer")
    def kf_customer() -> tuple[Response, int]:
        """{external_userid, text} or {external_userid, event: "enter"}; then the callback
        (`send_callback: false`: the pull Token is returned instead, the caller signals)."""
        spec = request.get_json(force=True, silent=True) or {}
        user = str(spec.get("external_userid", "")).strip()
        kfid = str(spec.get("open_kfid", "")).strip() or None
        text, event = str(spec.get("text", "")), str(spec.get("event", ""))
        if not user or not (text or event):
            return jsonify({"error": "external_userid and text (or event) are required"}), 400
        if event == "enter":
            code, token = kf.customer_enters(user, kfid)
            result: dict[str, Any] = {"welcome_code": code}
        else:
            msgid, token = kf.customer_says(user, text, kfid, str(spec.get("msgtype", "text")))
            result = {"msgid": msgid}
        if spec.get("send_callback") is False:  # the caller (simulator) signals the bridge
            return jsonify({**result, "token": token}), 200
        return jsonify({**result, "callback_status": kf.signal(kfid, token)}), 200

    @app.post("/_double/kf/servicer")
    def kf_servicer() -> tuple[Response, int]:
        """{external_userid, action: take|end|say, text?, servicer?}: a human servicer acts."""
        spec = request.get_json(force=True, silent=True) or {}
        user = str(spec.get("external_userid", "")).strip()
        kfid = str(spec.get("open_kfid", "")).strip() or None
        try:
            token = kf.servicer_action(
                user,
                str(spec.get("action", "")),
                str(spec.get("servicer", "") or "servicer01"),
                str(spec.get("text", "")),
                kfid,
            )
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 400
        return jsonify({"callback_status": kf.signal(kfid, token)}), 200

    @app.get("/_double/kf/sent")
    def kf_sent() -> Response | tuple[Response, int]:
        """What customers received; `?external_userid=U&after=T&wait=S` filters, long-polls."""
        try:
            after = float(request.args.get("after", 0) or 0)
            wait = float(request.args.get("wait", 0) or 0)
        except ValueError:
            return jsonify({"error": "after and wait must be numbers"}), 400
        user = request.args.get("external_userid") or None
        return jsonify({"messages": kf.sent_to(user, after, wait)})

    @app.get("/_double/kf/stats")
    def kf_stats() -> Response:
        return jsonify(kf.stats())

    @app.post("/_double/kf/faults")
    def kf_faults() -> Response | tuple[Response, int]:
        spec = request.get_json(force=True, silent=True) or {}
        try:
            for api, codes in spec.items():
                kf.fail_next(api, *codes)
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 400
        return jsonify({"ok": True})

    @app.post("/_double/kf/reset")
    def kf_reset() -> Response:
        kf.reset()
        return jsonify({"ok": True})
