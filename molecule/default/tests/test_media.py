"""One image in and one image out on the deployed stack: a member's screenshot with its caption
goes through the edge to the bridge, which fetches it from WeCom (media/get), uploads it to Dify
and asks with it; Dify's answer shows an image (a signed /files/… link under FILES_URL), which the
bridge downloads through Dify's nginx, uploads to WeCom (media/upload) and sends as an image
message after the answer's text."""

import base64
import json
import secrets
import shlex
import time

from conftest import CALLBACK_PATH, TEST_VARS, WECOM_DOUBLE, text_of
from wecom_bridge.testing.callbacks import build_media_callback, build_text_callback
from wecom_bridge.testing.dify_signed_files import tiny_png

DIFY_API = "dify-api-1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def dify_control(host, path, payload):
    """The Dify double's control API, from inside its container (not published)."""
    body = shlex.quote(json.dumps(payload))
    host.check_output(
        f"docker exec {DIFY_API} curl -sS --fail -X POST -H 'Content-Type: application/json'"
        f" -d {body} http://127.0.0.1:5001{path}"
    )


def wecom_json(edge, path, payload=None):
    method = "POST" if payload is not None else "GET"
    body = json.dumps(payload).encode() if payload is not None else None
    extra = ("-H", "Content-Type: application/json") if payload is not None else ()
    res = edge.request(f"{WECOM_DOUBLE}{path}", method=method, body=body, extra=extra)
    assert res.status == 200, res
    return json.loads(res.body)


def wait_for_messages(edge, user, count, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        mine = [m for m in edge.sent_messages() if m["touser"] == user]
        if len(mine) >= count or time.monotonic() > deadline:
            return mine
        time.sleep(1)


def test_an_image_in_and_an_image_out(host, edge, crypto):
    dify_control(host, "/_double/files", {"enabled": True, "allowed_file_types": ["image"]})
    user = f"media-{secrets.token_hex(3)}"
    screenshot = tiny_png(7)
    media_id = wecom_json(
        edge,
        "/_double/media",
        {
            "kind": "image",
            "filename": "shot.png",
            "content_base64": base64.b64encode(screenshot).decode(),
        },
    )["media_id"]
    agent = TEST_VARS["wecom_test_agent_id"]
    image = build_media_callback(
        crypto,
        from_user=user,
        msg_type="image",
        media_id=media_id,
        msg_id=str(secrets.randbits(62)),
        agent_id=agent,
    )
    caption = build_text_callback(
        crypto,
        from_user=user,
        content="#md-image 这张截图里是什么？",
        msg_id=str(secrets.randbits(62)),
        agent_id=agent,
    )
    for query, body in (image, caption):  # the caption within the window: one question
        res = edge.https(CALLBACK_PATH, method="POST", query=query, body=body)
        assert res.status == 200, res

    mine = wait_for_messages(edge, user, 3)
    kinds = [m["msgtype"] for m in mine]
    # Text, the image, the text after it: the answer's order, each part once.
    assert kinds == ["text", "image", "text"], mine
    assert "[files: image:shot.png]" in "".join(text_of(m) for m in mine)  # Dify got the image
    # What WeCom got through media/upload is a PNG (the image Dify's answer showed).
    url = f"{WECOM_DOUBLE}/_double/uploads/{mine[1]['image']['media_id']}"
    head = host.check_output(f"curl -sS --fail {shlex.quote(url)} | head -c 8 | base64")
    assert base64.b64decode(head) == PNG_MAGIC
    time.sleep(3)
    assert len([m for m in edge.sent_messages() if m["touser"] == user]) == 3  # nothing twice
