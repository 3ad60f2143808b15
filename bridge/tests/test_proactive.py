"""The send request model shared by the send API and the CLI."""

from __future__ import annotations

import pytest

from wecom_bridge.channels.proactive import Recipients, parse_send_request
from wecom_bridge.channels.wecom_app import outbound_message
from wecom_bridge.errors import SendRequestError


def test_parse_normalises_recipients_and_defaults() -> None:
    request, app = parse_send_request(
        {"touser": ["a", "b", "a"], "toparty": 3, "totag": "7|8", "msgtype": "text", "content": "x"}
    )
    assert app is None
    assert request.recipients == Recipients("a|b", "3", "7|8")
    assert (request.safe, request.enable_duplicate_check) == (0, 0)
    assert request.duplicate_check_interval == 1800


def test_payload_round_trip_and_message() -> None:
    request, app = parse_send_request(
        {"touser": "zhangsan", "msgtype": "markdown", "content": "**hi**", "safe": 1, "app": "hr"}
    )
    assert app == "hr"
    assert parse_send_request(request.payload())[0] == request
    body = outbound_message(request, "1000002", "text", "**hi**").payload()
    assert body["markdown"] == {"content": "**hi**"}
    assert (body["touser"], body["agentid"], body["safe"]) == ("zhangsan", 1000002, 1)
    assert "toparty" not in body


def test_job_user_and_rate_limit_keys() -> None:
    members = Recipients(touser="a|b")
    assert members.key() == "a|b"
    assert members.limit_keys("hr") == ["hr:a", "hr:b"]
    single = Recipients(touser="a")
    assert single.key() == "a"  # same line as a's chat answers
    mixed = Recipients(touser="a", toparty="2")
    assert mixed.key() == "touser=a;toparty=2"
    assert mixed.limit_keys("hr") == ["hr:a", "hr:touser=a;toparty=2"]


def test_limits_enforced() -> None:
    too_many = "|".join(f"u{n}" for n in range(1001))
    with pytest.raises(SendRequestError) as err:
        parse_send_request({"touser": too_many, "msgtype": "text", "content": "x"})
    assert err.value.field == "touser"
    with pytest.raises(SendRequestError) as err:
        parse_send_request({"touser": "u", "msgtype": "text", "content": "x" * 70_000})
    assert err.value.field == "content"
    with pytest.raises(SendRequestError) as err:
        parse_send_request({"touser": "u", "msgtype": "text", "content": "\ud800"})
    assert err.value.field == "content"
