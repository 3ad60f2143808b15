"""WeCom's send API as its documentation describes it (issue 18, point 9), in the double and
in the client: duplicate check, one token while valid, frequency-limit windows, unlicensed
recipients.

Sources: 发送应用消息 (developer.work.weixin.qq.com document path 90236: enable_duplicate_check,
duplicate_check_interval, invaliduser/unlicenseduser in the answer), 获取access_token (91039: the
same token while valid, early invalidation possible), 频率限制 (90454: blocks of a minute, an hour
or a day)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import requests
from conftest import FakeClock, plain_app

from wecom_bridge.channels.wecom_app import WeComAppOutbound
from wecom_bridge.errors import WeComApiError
from wecom_bridge.jobs.kinds import ChatJob, new_job
from wecom_bridge.jobs.processor import AppRuntime, JobProcessor
from wecom_bridge.jobs.store import SqliteStore
from wecom_bridge.metrics import Metrics
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.testing.wecom_double import WeComDoubleState, create_wecom_double
from wecom_bridge.wecom.api import MemoryTokenCache, WeComClient
from wecom_bridge.wecom.messages import OutboundMessage

CORP_ID, SECRET, AGENT_ID = "wwfacts01", "facts-secret-abcdef", "1000002"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000.0)


@pytest.fixture
def wecom(clock: FakeClock) -> Iterator[ServerThread]:
    app = create_wecom_double(corp_id=CORP_ID, secret=SECRET, agent_id=AGENT_ID, clock=clock)
    with ServerThread(app) as server:
        yield server


def state_of(server: ServerThread) -> WeComDoubleState:
    return server.app.extensions["wecom_double"]


def client_for(server: ServerThread, clock: FakeClock, **options: object) -> WeComClient:
    return WeComClient(
        api_base=server.url,
        corp_id=CORP_ID,
        secret=SECRET,
        token_cache=MemoryTokenCache(),
        clock=clock,
        sleep=lambda _: None,
        **options,  # type: ignore[arg-type]
    )


def gettoken(server: ServerThread) -> dict:
    params = {"corpid": CORP_ID, "corpsecret": SECRET}
    return requests.get(server.url + "/cgi-bin/gettoken", params=params, timeout=5).json()


def test_gettoken_returns_the_same_token_while_it_is_valid(wecom, clock) -> None:
    first = gettoken(wecom)
    clock.now += 1000
    again = gettoken(wecom)
    assert again["access_token"] == first["access_token"]
    assert again["expires_in"] == 7200 - 1000  # what is left of it
    clock.now += 6200
    assert gettoken(wecom)["access_token"] != first["access_token"]  # expired: a new one
    state_of(wecom).expire_tokens()  # invalidated early
    assert gettoken(wecom)["access_token"] != again["access_token"]


def test_client_uses_the_token_to_its_end_without_hammering_gettoken(wecom, clock) -> None:
    client = client_for(wecom, clock)
    first = client.access_token()
    clock.now += 7200 - 300 + 1  # the client refreshes early: WeCom hands out the same token
    assert client.access_token() == first
    for _ in range(50):
        client.access_token()
    assert state_of(wecom).gettoken_calls == 2
    clock.now += 300
    assert client.access_token() != first
    assert state_of(wecom).gettoken_calls <= 12  # a handful while the old one ran out


def test_duplicate_check_is_honoured(wecom, clock) -> None:
    client = client_for(wecom, clock)
    message = OutboundMessage(
        agent_id=AGENT_ID,
        content="月报已生成",
        touser="alice",
        enable_duplicate_check=1,
        duplicate_check_interval=600,
    )
    first = client.send(message)
    second = client.send(message)
    assert second.msgid == first.msgid
    assert [m["text"]["content"] for m in state_of(wecom).snapshot()] == ["月报已生成"]
    assert len(state_of(wecom).duplicates) == 1
    clock.now += 601
    client.send(message)  # the interval is over: delivered again
    assert len(state_of(wecom).snapshot()) == 2
    client.send(OutboundMessage(agent_id=AGENT_ID, content="月报已生成", touser="alice"))
    assert len(state_of(wecom).snapshot()) == 3  # without the check: always delivered


def test_frequency_limit_is_not_retried_within_seconds(wecom, clock) -> None:
    sleeps: list[float] = []
    client = WeComClient(
        api_base=wecom.url,
        corp_id=CORP_ID,
        secret=SECRET,
        token_cache=MemoryTokenCache(),
        clock=clock,
        sleep=sleeps.append,
    )
    state_of(wecom).fail_next("send", 45009)
    with pytest.raises(WeComApiError) as caught:
        client.send(OutboundMessage(agent_id=AGENT_ID, content="x", touser="alice"))
    assert caught.value.errcode == 45009
    assert caught.value.retryable and caught.value.retry_after >= 60
    assert sleeps == []
    assert state_of(wecom).send_calls == 1


def test_job_waits_out_a_frequency_block(wecom, clock, tmp_path) -> None:
    app = dataclasses.replace(plain_app(), corp_id=CORP_ID, agent_id=AGENT_ID)
    store = SqliteStore(tmp_path)
    outbound = WeComAppOutbound(app, client_for(wecom, clock))
    processor = JobProcessor(store, {"default": AppRuntime(app, None, outbound)}, Metrics())
    store.enqueue("default", new_job("alice", ChatJob("问题")))
    job = store.claim("w", 15)
    store.save_parts(job.id, ["答案"], {})
    state_of(wecom).fail_next("send", 45009)
    processor.process(store.get_job(job.id))
    retried = store.get_job(job.id)
    assert retried.status == "queued" and retried.errcode == 45009
    assert store.next_available_in() >= 59  # not 5 s later


def test_unlicensed_recipients_are_reported_not_counted_as_delivered(wecom, clock) -> None:
    metrics = Metrics()
    state_of(wecom).set_unlicensed_users("bob")
    client = client_for(wecom, clock, metrics=metrics)
    only_bob = client.send(OutboundMessage(agent_id=AGENT_ID, content="hi", touser="bob"))
    assert only_bob.unlicenseduser == "bob" and not only_bob.delivered
    assert state_of(wecom).snapshot() == []
    both = client.send(OutboundMessage(agent_id=AGENT_ID, content="hi", touser="alice|bob"))
    assert both.unlicenseduser == "bob" and both.delivered
    assert metrics.value("wecom_bridge_wecom_messages_sent_total") == 1
    assert metrics.value("wecom_bridge_wecom_undelivered_total", {"reason": "unlicenseduser"}) == 1
