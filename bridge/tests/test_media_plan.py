"""Planning an answer's media parts, and fetching Dify's files within the limits (real HTTP
against a small server on loopback that plays a hostile or broken file host)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask, Response

from wecom_bridge.config import MediaSettings
from wecom_bridge.dify.client import DifyFile, DifySettings
from wecom_bridge.dify.files import DifyFileFetcher, FileFetchError, is_public
from wecom_bridge.jobs.media_out import (
    AnswerPlan,
    fetch_url,
    plan_answer,
    sniff,
    stored_media,
    stored_stream_images,
    without_images,
)
from wecom_bridge.jobs.splitter import split_message
from wecom_bridge.testing.dify_signed_files import tiny_png
from wecom_bridge.testing.server import ServerThread

DIFY = DifySettings(api_base="http://127.0.0.1:8080/v1", api_key="k")
LIMIT = 2048


def plan(text: str, files: tuple[DifyFile, ...] = ()) -> AnswerPlan:
    return plan_answer(text, files, DIFY, MediaSettings(), LIMIT)


def test_an_answer_without_media_is_split_as_before() -> None:
    text = "第一段。\n\n" + "长" * 1500 + "\n\n[官网](https://example.com/page) 和 [附件](/api/x)"
    result = plan(text)
    assert result.parts == split_message(text, LIMIT) and result.media == {}
    assert result.result() == {}


def test_images_and_dify_file_links_become_media_parts_in_order() -> None:
    text = (
        "看图：![图一](/files/tools/a.png?sign=1) 中间 [报告.pdf](http://127.0.0.1:8080/files/b/"
        "file-preview?sign=2) 结尾 [外链](https://example.com/c.pdf)"
    )
    result = plan(text)
    assert result.parts[0] == "看图："
    assert result.parts[2] == "中间"
    assert result.parts[4] == "结尾 [外链](https://example.com/c.pdf)"  # not Dify's: text
    assert {i: (r.kind, r.name) for i, r in result.media.items()} == {
        1: ("image", "图一"),
        3: ("file", "报告.pdf"),
    }
    assert result.media[1].url == "http://127.0.0.1:8080/files/tools/a.png?sign=1"
    assert result.parts[1] == "图一：http://127.0.0.1:8080/files/tools/a.png?sign=1"
    assert stored_media(result.result()) == result.media


def test_event_files_follow_the_text_unless_the_text_shows_them() -> None:
    shown = DifyFile("a", "image", "/files/tools/a.png?sign=1")
    extra = DifyFile("b", "document", "/files/tools/b.xlsx?sign=2")
    result = plan("表格如下 ![](/files/tools/a.png?sign=other)", (shown, extra))
    assert [(r.kind, r.name) for r in result.media.values()] == [
        ("image", "a.png"),
        ("file", "b.xlsx"),
    ]
    assert result.parts[0] == "表格如下"


def test_files_url_moves_where_relative_links_point() -> None:
    moved = DifySettings(api_base="http://dify:5001/v1", api_key="k", files_url="https://kb.cn")
    result = plan_answer("![x](/files/tools/a.png)", (), moved, MediaSettings(), LIMIT)
    assert result.media[0].url == "https://kb.cn/files/tools/a.png"


def test_sniff_reads_the_magic_bytes() -> None:
    assert sniff(tiny_png()) == "png"
    assert sniff(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert sniff(b"GIF89a....") == "gif"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff(b"<html>") is None


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # loopback dressed as IPv6
        ("0.0.0.0", False),  # noqa: S104 - an address checked, not bound
    ],
)
def test_only_public_addresses_are_fetched_from_hosts_that_are_not_dify(
    address: str, public: bool
) -> None:
    assert is_public(address) is public


# --- a hostile file host ---------------------------------------------------------------------


@pytest.fixture
def host() -> Iterator[ServerThread]:
    app = Flask("hostile")

    @app.get("/files/redirect.png")
    def redirect() -> Response:
        return Response("", status=302, headers={"Location": "http://169.254.169.254/x"})

    @app.get("/files/bomb.png")
    def bomb() -> Response:
        body = gzip.compress(bytes(50 * 1024 * 1024))  # ~50 KB on the wire, 50 MB unpacked
        return Response(body, headers={"Content-Encoding": "gzip", "Content-Type": "image/png"})

    @app.get("/files/endless.bin")
    def endless() -> Response:
        def chunks() -> Iterator[bytes]:
            while True:
                yield bytes(64 * 1024)

        return Response(chunks(), mimetype="application/octet-stream")  # no Content-Length

    @app.get("/files/declared.bin")
    def declared() -> Response:
        return Response(iter([b"x"]), headers={"Content-Length": str(10**9)})

    @app.get("/files/named")
    def named() -> Response:
        headers = {"Content-Disposition": "attachment; filename*=UTF-8''%E6%8A%A5%E5%91%8A.pdf"}
        return Response(b"%PDF-1.4 body", headers=headers, mimetype="application/pdf")

    with ServerThread(app) as server:
        yield server


def fetch(host: ServerThread, path: str, tmp_path: Path, limit: int = 1024 * 1024):
    fetcher = DifyFileFetcher([host.url], timeout=5.0)
    return fetcher.fetch(host.url + path, tmp_path / "f", limit)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/files/redirect.png", "refused"),  # redirects are not followed
        ("/files/bomb.png", "too_large"),  # the cap counts unpacked bytes
        ("/files/endless.bin", "too_large"),  # the cap holds without a Content-Length
        ("/files/declared.bin", "too_large"),  # refused before reading
        ("/files/missing", "http"),
    ],
)
def test_what_a_file_host_cannot_make_the_bridge_do(
    host: ServerThread, tmp_path: Path, path: str, reason: str
) -> None:
    with pytest.raises(FileFetchError) as caught:
        fetch(host, path, tmp_path)
    assert caught.value.reason == reason
    assert list(tmp_path.iterdir()) == []  # nothing half-written stays


def test_the_served_name_is_kept_without_its_path(host: ServerThread, tmp_path: Path) -> None:
    fetched = fetch(host, "/files/named", tmp_path)
    assert (fetched.filename, fetched.size) == ("报告.pdf", 13)
    assert fetched.path.read_bytes() == b"%PDF-1.4 body"


def test_a_loopback_host_that_is_not_a_configured_dify_is_refused(
    host: ServerThread, tmp_path: Path
) -> None:
    fetcher = DifyFileFetcher(["http://127.0.0.1:1"], timeout=5.0)  # Dify is elsewhere
    with pytest.raises(FileFetchError) as caught:
        fetcher.fetch(host.url + "/files/named", tmp_path / "f", 1024)
    assert caught.value.reason == "refused" and "internal address" in caught.value.detail


def test_links_at_the_public_files_url_are_fetched_through_the_api_origin() -> None:
    """Dify's FILES_URL is the public name (often not reachable from the bridge's container);
    the same signed path is fetched at DIFY_API_BASE's origin, and the member's link keeps
    the public one."""
    moved = DifySettings(api_base="http://nginx/v1", api_key="k", files_url="https://kb.cn")
    public = "https://kb.cn/files/tools/a.png?timestamp=1&nonce=2&sign=3"
    assert fetch_url(public, moved) == "http://nginx/files/tools/a.png?timestamp=1&nonce=2&sign=3"
    assert (
        fetch_url("https://elsewhere.cn/files/a.png", moved) == "https://elsewhere.cn/files/a.png"
    )
    result = plan_answer(f"![x]({public})", (), moved, MediaSettings(), LIMIT)
    assert result.parts == [f"x：{public}"]


def test_inline_plan_for_channels_without_media_keeps_the_parts_few() -> None:
    """微信客服 (5 messages per customer message) and the webhook bot (a stream and one late
    call) send no files: each becomes its link inside the text, split as usual."""
    event = DifyFile("b", "image", "/files/tools/b.png?sign=2")
    text = "前言 ![图一](/files/tools/a.png?sign=1) 后记"
    result = plan_answer(text, (event,), DIFY, MediaSettings(), LIMIT, inline=True)
    assert result.media == {}
    assert result.parts == [
        "前言\n\n图一：http://127.0.0.1:8080/files/tools/a.png?sign=1\n\n后记\n\n"
        "b.png：http://127.0.0.1:8080/files/tools/b.png?sign=2"
    ]


def test_the_stream_shows_the_text_without_its_images() -> None:
    text = "前 ![图](/files/tools/a.png?sign=1) 后 [报告](/files/b/file-preview) "
    assert without_images(text) == "前  后 [报告](/files/b/file-preview) "
    # An image still being written does not show its half either.
    assert without_images(text + "![半](/files/to") == "前  后 [报告](/files/b/file-preview) "


def stream_plan(text: str, files: tuple[DifyFile, ...] = (), most: int = 10) -> AnswerPlan:
    return plan_answer(text, files, DIFY, MediaSettings(), LIMIT, inline=True, stream_images=most)


def test_a_stream_plan_takes_the_images_out_of_the_text_and_links_the_files() -> None:
    """The webhook bot: images ride on the stream's finish, files stay as their links."""
    text = "看图：![图一](/files/tools/a.png?s=1) 再看 [报告.pdf](/files/b/file-preview?s=2) 完"
    event = DifyFile(id="e", type="image", url="/files/tools/e.png?s=3", filename="")
    result = stream_plan(text, (event,))
    assert [(r.kind, r.name) for r in result.images] == [("image", "图一"), ("image", "e.png")]
    assert result.media == {} and len(result.parts) == 1
    assert "图一" not in result.parts[0] and "a.png" not in result.parts[0]
    assert "报告.pdf：http://127.0.0.1:8080/files/b/file-preview?s=2" in result.parts[0]
    assert stored_stream_images(result.result()) == result.images


def test_a_stream_plan_keeps_room_for_links_and_caps_the_images() -> None:
    images = " ".join(f"![p{n}](/files/tools/{n}.png?s={n})" for n in range(12))
    result = stream_plan("长" * 3000 + images, most=10)
    assert [r.name for r in result.images] == [f"p{n}" for n in range(10)]
    assert "p10：http://127.0.0.1:8080/files/tools/10.png" in result.parts[-1]  # beyond 10
    links = "\n\n".join(f"{r.name}：{r.url}" for r in result.images)
    assert len(result.parts[0].encode()) + len(links.encode()) + 2 <= LIMIT
    only_image = stream_plan("![图表](/files/tools/x.png?s=1)")
    assert only_image.parts == ["图表"] and len(only_image.images) == 1  # a text to finish with
