"""XML parsing: messages, events, malformed input, entity bombs."""

import pytest

from wecom_bridge.errors import MalformedXmlError
from wecom_bridge.wecom.messages import OutboundMessage, parse_envelope, parse_message

TEXT = (
    b"<xml><ToUserName><![CDATA[ww1]]></ToUserName><FromUserName><![CDATA[zhangsan]]>"
    b"</FromUserName><CreateTime>1348831860</CreateTime><MsgType><![CDATA[text]]></MsgType>"
    b"<Content><![CDATA[\xe4\xbd\xa0\xe5\xa5\xbd <b>&amp;]]></Content>"
    b"<MsgId>1234567890123456</MsgId>"
    b"<AgentID>1000002</AgentID></xml>"
)


def test_text_message() -> None:
    msg = parse_message(TEXT)
    assert (msg.from_user, msg.msg_type, msg.content) == ("zhangsan", "text", "你好 <b>&amp;")
    assert msg.create_time == 1348831860
    assert msg.dedupe_key() == "msg:1234567890123456"


def test_event_dedupe_key_includes_event_and_key() -> None:
    xml = (
        b"<xml><ToUserName>ww1</ToUserName><FromUserName>lisi</FromUserName>"
        b"<CreateTime>1700000000</CreateTime><MsgType>event</MsgType><Event>click</Event>"
        b"<EventKey>k1</EventKey><AgentID>1</AgentID></xml>"
    )
    msg = parse_message(xml)
    assert msg.is_event
    assert msg.dedupe_key() == "event:lisi:1700000000:click:k1"


def test_image_message_keeps_extra_fields() -> None:
    xml = (
        b"<xml><ToUserName>ww1</ToUserName><FromUserName>u</FromUserName><CreateTime>1</CreateTime>"
        b"<MsgType>image</MsgType><PicUrl>http://x/y</PicUrl><MediaId>m1</MediaId><MsgId>9</MsgId>"
        b"</xml>"
    )
    msg = parse_message(xml)
    assert msg.extra == {"PicUrl": "http://x/y", "MediaId": "m1"}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not xml",
        b"<xml><a>unclosed</xml>",
        b"<other><Encrypt>x</Encrypt></other>",
        b"<xml>text only</xml>",
    ],
)
def test_malformed_envelope(body: bytes) -> None:
    with pytest.raises(MalformedXmlError):
        parse_envelope(body)


def test_envelope_needs_encrypt() -> None:
    with pytest.raises(MalformedXmlError):
        parse_envelope(b"<xml><ToUserName>ww</ToUserName></xml>")


def test_billion_laughs_refused() -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
        b"<xml><Encrypt>&lol2;</Encrypt></xml>"
    )
    with pytest.raises(MalformedXmlError):
        parse_envelope(bomb)


def test_external_entity_refused() -> None:
    xxe = (
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        b"<xml><Encrypt>&e;</Encrypt></xml>"
    )
    with pytest.raises(MalformedXmlError):
        parse_envelope(xxe)


def test_message_without_sender_refused() -> None:
    with pytest.raises(MalformedXmlError):
        parse_message(b"<xml><MsgType>text</MsgType></xml>")


def test_outbound_payload() -> None:
    payload = OutboundMessage(agent_id="1000002", content="hi", touser="a|b").payload()
    assert payload["agentid"] == 1000002
    assert payload["text"] == {"content": "hi"}
    assert payload["touser"] == "a|b"
    assert "toparty" not in payload
