"""WeCom delivering callbacks under load and faults, and the tally of what members then received.

WeCom waits 5 s for an HTTP 200; after a timeout, a network error or another status it delivers
the same callback again, up to three more times (WeCom's callback documentation: it "retries
three times", about 5 s apart). `Deliverer` plays that for many messages at once, each
optionally delivered several times on a schedule on top (a redelivery storm). `tally` reads what
the WeCom API double recorded and counts, per message: acknowledged, answered, duplicated, lost.

Every message comes from its own member (`<tag>-<n>`), so an answer is matched by its recipient,
whether it is the Dify answer (which contains the question) or the bridge's fallback text.
Used by the molecule reliability tests and bench/ against the deployed stack.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from wecom_bridge.testing.callbacks import build_text_callback, new_msg_id
from wecom_bridge.wecom.crypto import WeComCrypto

NETWORK_ERROR = 0  # the status recorded for an attempt that got no HTTP answer


@dataclass(frozen=True)
class WeComRetry:
    """How WeCom retries one delivery: `attempts` in all, `interval` apart, `timeout` each."""

    attempts: int = 4
    interval: float = 5.0
    timeout: float = 5.0


@dataclass(frozen=True)
class Message:
    user: str
    text: str
    params: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)


@dataclass
class Outcome:
    """Every HTTP status one message's deliveries got, in order (0: no answer)."""

    message: Message
    statuses: list[int] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return 200 in self.statuses


@dataclass(frozen=True)
class Tally:
    sent: int
    acknowledged: int
    answered: int
    fallbacks: int
    duplicates: int
    lost: int
    unacknowledged: int
    deliveries: int
    non_200: int

    def line(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.__dict__.items())


def make_messages(
    crypto: WeComCrypto, agent_id: str, tag: str, count: int, text: str = "question"
) -> list[Message]:
    """`count` distinct, correctly signed and encrypted text callbacks, one member each."""
    messages = []
    for n in range(count):
        user, content = f"{tag}-{n}", f"{text} {tag}-{n}"
        params, body = build_text_callback(
            crypto, from_user=user, content=content, msg_id=new_msg_id(), agent_id=agent_id
        )
        messages.append(Message(user, content, params, body))
    return messages


class _SniAdapter(HTTPAdapter):
    """Connects to the URL's address but presents `hostname` for SNI and certificate checks."""

    def __init__(self, hostname: str, pool_size: int) -> None:
        self._hostname = hostname
        super().__init__(pool_connections=1, pool_maxsize=pool_size)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self._hostname
        kwargs["assert_hostname"] = self._hostname
        super().init_poolmanager(*args, **kwargs)


class Deliverer:
    """POSTs callbacks to `url` the way WeCom does, from up to `concurrency` connections.

    `hostname`: the callback URL's domain when `url` names the edge by address (tests reach the
    server container by IP): used for Host, SNI and certificate verification.
    """

    def __init__(
        self,
        url: str,
        *,
        verify: bool | str = True,
        hostname: str | None = None,
        retry: WeComRetry = WeComRetry(),
        concurrency: int = 32,
    ) -> None:
        self.url = url
        self.verify = verify
        self.retry = retry
        self.concurrency = concurrency
        self.acknowledged = 0  # 200s so far, for tests that strike mid-burst
        self._lock = threading.Lock()
        self.session = requests.Session()
        self.headers = {"Content-Type": "text/xml; charset=utf-8"}
        if hostname:
            self.session.mount("https://", _SniAdapter(hostname, concurrency))
            self.headers["Host"] = hostname
        else:
            self.session.mount("https://", HTTPAdapter(pool_maxsize=concurrency))
            self.session.mount("http://", HTTPAdapter(pool_maxsize=concurrency))

    def post_once(self, message: Message) -> int:
        try:
            resp = self.session.post(
                self.url,
                params=message.params,
                data=message.body,
                headers=self.headers,
                verify=self.verify,
                timeout=self.retry.timeout,
            )
        except requests.RequestException:
            return NETWORK_ERROR
        if resp.status_code == 200:
            with self._lock:
                self.acknowledged += 1
        return resp.status_code

    def deliver(self, message: Message) -> list[int]:
        """One delivery with WeCom's retries: stops at the first 200."""
        statuses = []
        for attempt in range(self.retry.attempts):
            if attempt:
                time.sleep(self.retry.interval)
            statuses.append(self.post_once(message))
            if statuses[-1] == 200:
                break
        return statuses

    def deliver_all(
        self,
        messages: Sequence[Message],
        schedule: Sequence[float] = (0.0,),
        spread: float = 0.0,
    ) -> list[Outcome]:
        """Deliver every message once per `schedule` entry (seconds after the start), all
        messages concurrently; each delivery retried as WeCom would.

        `spread`: the messages arrive evenly over this many seconds instead of all at once, so
        that a fault struck mid-burst still finds deliveries to interrupt on a fast machine."""
        outcomes = [Outcome(m) for m in messages]
        step = spread / len(messages) if messages else 0.0
        due = [(offset + n * step, n) for offset in schedule for n in range(len(messages))]
        heapq.heapify(due)
        lock = threading.Lock()

        def run(n: int) -> None:
            statuses = self.deliver(messages[n])
            with lock:
                outcomes[n].statuses.extend(statuses)

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            futures = []
            while due:
                offset, n = heapq.heappop(due)
                time.sleep(max(0.0, start + offset - time.monotonic()))
                futures.append(pool.submit(run, n))
            for future in futures:
                future.result()
        return outcomes


def recorded_messages(wecom_api: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    resp = requests.get(f"{wecom_api}/_double/messages", timeout=timeout)
    resp.raise_for_status()
    return list(resp.json()["messages"])


def answer_texts(records: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Each recipient's answers (their text or markdown content), in the order recorded."""
    texts: dict[str, list[str]] = {}
    for record in records:
        content = str(record.get(record.get("msgtype", "text"), {}).get("content", ""))
        for user in str(record.get("touser", "")).split("|"):
            texts.setdefault(user, []).append(content)
    return texts


def answers_by_user(records: Iterable[dict[str, Any]]) -> Counter[str]:
    return Counter({user: len(texts) for user, texts in answer_texts(records).items()})


def wait_for_answers(
    wecom_api: str, outcomes: Sequence[Outcome], timeout: float, settle: float = 3.0
) -> list[dict[str, Any]]:
    """The double's records once every acknowledged message has an answer (or at `timeout`),
    plus `settle` seconds so that a duplicate answer would also be seen."""
    expected = {o.message.user for o in outcomes if o.acknowledged}
    deadline = time.monotonic() + timeout
    while True:
        records = recorded_messages(wecom_api)
        if expected <= set(answers_by_user(records)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    time.sleep(settle)
    return recorded_messages(wecom_api)


def tally(outcomes: Sequence[Outcome], records: Iterable[dict[str, Any]]) -> Tally:
    """Counts for these messages only (the double may hold other runs' records)."""
    texts = answer_texts(records)
    answered = [o for o in outcomes if texts.get(o.message.user)]
    fallbacks = [o for o in answered if not any(o.message.text in t for t in texts[o.message.user])]
    return Tally(
        sent=len(outcomes),
        acknowledged=sum(o.acknowledged for o in outcomes),
        answered=len(answered),
        fallbacks=len(fallbacks),
        duplicates=sum(max(0, len(texts.get(o.message.user, [])) - 1) for o in outcomes),
        lost=sum(1 for o in outcomes if o.acknowledged and not texts.get(o.message.user)),
        unacknowledged=sum(not o.acknowledged for o in outcomes),
        deliveries=sum(len(o.statuses) for o in outcomes),
        non_200=sum(1 for o in outcomes for s in o.statuses if s != 200),
    )
