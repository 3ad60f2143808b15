"""WeComClient against the WeCom API double over real HTTP on loopback."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import FakeClock

from wecom_bridge.errors import WeComApiError, WeComConfigError
from wecom_bridge.metrics import Metrics
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.testing.wecom_double import WeComDoubleState, create_wecom_double
from wecom_bridge.wecom.api import MemoryTokenCache, WeComClient
from wecom_bridge.wecom.messages import OutboundMessage

CORP_ID = "wwclienttest01"
SECRET = "client-test-secret-abcdef"
AGENT_ID = "1000002"


@pytest.fixture
def wecom_server() -> Iterator[ServerThread]:
    app = create_wecom_double(corp_id=CORP_ID, secret=SECRET, agent_id=AGENT_ID)
    with ServerThread(app) as server:
        yield server


def state_of(server: ServerThread) -> WeComDoubleState:
    return server.app.extensions["wecom_double"]


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_client(wecom_server: ServerThread, sleeps: list[float]) -> Callable[..., WeComClient]:
    def make(**overrides: object) -> WeComClient:
        options: dict = {
            "api_base": wecom_server.url,
            "corp_id": CORP_ID,
            "secret": SECRET,
            "token_cache": MemoryTokenCache(),
            "sleep": sleeps.append,
            "timeout": (2.0, 5.0),
        }
        options.update(overrides)
        return WeComClient(**options)

    return make


def text(content: str, user: str = "alice") -> OutboundMessage:
    return OutboundMessage(agent_id=AGENT_ID, content=content, touser=user)


def contents(server: ServerThread) -> list[str]:
    return [m["text"]["content"] for m in state_of(server).snapshot()]


def test_token_is_cached_across_sends(make_client, wecom_server) -> None:
    metrics = Metrics()
    client = make_client(metrics=metrics)
    for i in range(5):
        result = client.send(text(f"part {i}"))
        assert result.msgid
    state = state_of(wecom_server)
    assert state.gettoken_calls == 1
    assert contents(wecom_server) == [f"part {i}" for i in range(5)]
    body = state.snapshot()[0]
    assert body["touser"] == "alice"
    assert body["agentid"] == int(AGENT_ID)
    assert body["msgtype"] == "text"
    assert metrics.value("wecom_bridge_token_refreshes_total") == 1
    assert metrics.value("wecom_bridge_wecom_messages_sent_total") == 5


def test_concurrent_senders_share_one_refresh(make_client, wecom_server) -> None:
    client = make_client()
    barrier = threading.Barrier(12)
    errors: list[BaseException] = []

    def send(i: int) -> None:
        barrier.wait()
        try:
            client.send(text(f"m{i}", user=f"user{i}"))
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert state_of(wecom_server).gettoken_calls == 1
    assert sorted(contents(wecom_server)) == sorted(f"m{i}" for i in range(12))


@pytest.mark.parametrize("errcode", [40014, 42001, 42007, 42009])
def test_rejected_token_is_refreshed_and_the_call_retried_once(
    make_client, wecom_server, errcode: int
) -> None:
    client = make_client()
    client.send(text("before"))
    state_of(wecom_server).fail_next("send", errcode)
    client.send(text("after"))
    assert state_of(wecom_server).gettoken_calls == 2
    assert contents(wecom_server) == ["before", "after"]


def test_tokens_expired_by_wecom_are_replaced(make_client, wecom_server, sleeps) -> None:
    client = make_client()
    client.send(text("one"))
    state_of(wecom_server).expire_tokens()
    client.send(text("two"))
    assert state_of(wecom_server).gettoken_calls == 2
    assert contents(wecom_server) == ["one", "two"]
    assert sleeps == []


def test_token_refreshed_before_it_expires(make_client, wecom_server) -> None:
    clock = FakeClock()
    client = make_client(clock=clock)
    first = client.access_token()
    clock.now += 7200 - 300 - 1
    assert client.access_token() == first
    assert state_of(wecom_server).gettoken_calls == 1
    clock.now += 2
    client.access_token()  # asks again, 5 minutes early (WeCom answers with the same token)
    assert state_of(wecom_server).gettoken_calls == 2


def test_token_persisted_through_the_cache(make_client, wecom_server) -> None:
    cache = MemoryTokenCache()
    make_client(token_cache=cache).send(text("from the first process"))
    (key,) = cache._tokens
    assert SECRET not in key
    assert key.startswith(CORP_ID + ":")
    restarted = make_client(token_cache=cache)
    restarted.send(text("after a restart"))
    assert state_of(wecom_server).gettoken_calls == 1


def test_wrong_secret_is_a_config_error_reported_once(make_client, wecom_server, caplog) -> None:
    clock = FakeClock()
    client = make_client(secret="wrong-secret", clock=clock, config_error_cooldown=60.0)
    caplog.set_level(logging.DEBUG, logger="wecom_bridge.wecom")
    with pytest.raises(WeComConfigError) as first:
        client.send(text("hello"))
    assert first.value.errcode == 40001
    assert "WECOM_SECRET" in first.value.hint
    for _ in range(3):
        with pytest.raises(WeComConfigError):
            client.send(text("hello"))
    state = state_of(wecom_server)
    assert state.gettoken_calls == 1, "no gettoken while cooling down"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "wrong-secret" not in caplog.text
    clock.now += 61
    with pytest.raises(WeComConfigError):
        client.access_token()
    assert state.gettoken_calls == 2
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_untrusted_ip_names_the_ip_to_add(make_client, wecom_server, caplog, sleeps) -> None:
    state = state_of(wecom_server)
    state.fail_next("gettoken", 60020)
    client = make_client()
    caplog.set_level(logging.INFO, logger="wecom_bridge.wecom")
    with pytest.raises(WeComConfigError) as caught:
        client.send(text("hello"))
    assert caught.value.errcode == 60020
    assert "add 203.0.113.7 to 企业可信IP" in caught.value.hint
    assert sleeps == [], "config errors are not retried"
    with pytest.raises(WeComConfigError):
        client.access_token()
    assert state.gettoken_calls == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "203.0.113.7" in errors[0].getMessage()


def test_untrusted_ip_on_send_stops_further_sends(make_client, wecom_server) -> None:
    client = make_client()
    client.send(text("ok"))
    state = state_of(wecom_server)
    state.fail_next("send", 60020)
    with pytest.raises(WeComConfigError, match="60020"):
        client.send(text("refused"))
    calls = state.send_calls
    with pytest.raises(WeComConfigError):
        client.send(text("not even tried"))
    assert state.send_calls == calls


@pytest.mark.parametrize("errcode", [45033, -1])
def test_transient_errors_are_retried_with_backoff(
    make_client, wecom_server, sleeps, errcode: int
) -> None:
    metrics = Metrics()
    client = make_client(metrics=metrics, backoff_base=1.0)
    state_of(wecom_server).fail_next("send", errcode, errcode)
    client.send(text("eventually"))
    assert contents(wecom_server) == ["eventually"]
    assert len(sleeps) == 2
    assert 1.0 <= sleeps[0] <= 1.5
    assert 2.0 <= sleeps[1] <= 3.0
    labels = {"errcode": str(errcode)}
    assert metrics.value("wecom_bridge_wecom_send_errors_total", labels) == 2
    assert metrics.value("wecom_bridge_wecom_messages_sent_total") == 1


def test_gives_up_after_max_attempts(make_client, wecom_server, sleeps) -> None:
    client = make_client(max_attempts=4)
    state_of(wecom_server).fail_next("send", *[45033] * 4)
    with pytest.raises(WeComApiError) as caught:
        client.send(text("lost?"))
    assert caught.value.errcode == 45033
    assert caught.value.retryable
    assert len(sleeps) == 3
    assert contents(wecom_server) == []


def test_other_errcodes_fail_at_once(make_client, wecom_server, sleeps) -> None:
    client = make_client()
    with pytest.raises(WeComApiError) as caught:
        client.send(OutboundMessage(agent_id="999", content="wrong app", touser="alice"))
    assert caught.value.errcode == 40056
    assert not caught.value.retryable
    assert not isinstance(caught.value, WeComConfigError)
    assert sleeps == []


def log_everything_but_urllib3(caplog: pytest.LogCaptureFixture) -> None:
    """urllib3's DEBUG lines show query strings; the bridge's logging setup silences them."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="wecom_bridge")


def test_network_errors_are_retryable_and_logs_hold_no_secret(make_client, caplog, sleeps) -> None:
    log_everything_but_urllib3(caplog)
    client = make_client(api_base="http://127.0.0.1:9", max_attempts=3, timeout=(0.5, 0.5))
    with pytest.raises(WeComApiError) as caught:
        client.send(text("nobody listens"))
    assert caught.value.errcode is None
    assert caught.value.retryable
    assert len(sleeps) == 2
    assert SECRET not in caplog.text
    assert SECRET not in str(caught.value)


def test_tokens_never_logged(make_client, wecom_server, caplog) -> None:
    log_everything_but_urllib3(caplog)
    client = make_client()
    client.send(text("x"))
    state_of(wecom_server).fail_next("send", 42001)
    client.send(text("y"))
    for token in state_of(wecom_server).tokens:
        assert token not in caplog.text
    assert SECRET not in caplog.text


def test_generic_call(make_client) -> None:
    data = make_client().call("GET", "/cgi-bin/getcallbackip")
    assert data["ip_list"]


def test_send_is_quick(make_client) -> None:
    client = make_client()
    client.send(text("warm up"))
    started = time.monotonic()
    for i in range(20):
        client.send(text(f"fast {i}", user=f"u{i}"))
    assert time.monotonic() - started < 5
