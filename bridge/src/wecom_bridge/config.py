"""Configuration from environment variables (one app) or an apps file (several apps).

Every problem raises ConfigError naming the variable, so startup stops with a message an
operator can act on. Secret values are never part of an error message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from wecom_bridge.dify.client import APP_MODES, DEFAULT_MAX_CONCURRENCY, DifySettings
from wecom_bridge.errors import ConfigError, MissingSettingError
from wecom_bridge.wecom.api import DEFAULT_API_BASE
from wecom_bridge.wecom.crypto import parse_encoding_aes_key

DEFAULT_RESET_WORDS = ("/reset", "新对话", "重置会话")
DEFAULT_FALLBACK = "抱歉，知识库暂时无法回答，请稍后再试。"
DEFAULT_RESET_REPLY = "好的，已开始新的对话。"
DEFAULT_UNSUPPORTED = "暂时不支持这类消息，请换一种方式提问。"
DEFAULT_TRUNCATED = "\n……（回答超出本渠道一次回复的条数上限，其余部分未能发送）"
DEFAULT_PAUSED = "您的问题需要人工处理，流程已转交相关人员，暂时无法在这里直接答复。"
# What a member hears when the media they sent cannot go to Dify ({kind}: 图片/文件/语音,
# {limit}: e.g. 10 MB), by the media stage's reason.
DEFAULT_MEDIA_REPLIES = {
    "type": "这个知识库暂不接收{kind}，请用文字描述您的问题。",
    "too_large": "{kind}太大（上限 {limit}），请压缩后再发，或用文字提问。",
    "corrupt": "无法识别这个{kind}（内容损坏或与类型不符），请重新发送。",
    "expired": "这个{kind}已过期，请重新发送。",
    "failed": "{kind}接收失败，请稍后重新发送。",
    "voice_off": "暂时不能识别语音，请用文字提问。",
    "no_speech": "没有听清您的语音，请再说一遍或用文字提问。",
}
# Their variables: BRIDGE_<NAME> (apps file: <name> in lower case).
MEDIA_REPLY_VARIABLES = {
    "type": "MEDIA_TYPE_REPLY",
    "too_large": "MEDIA_TOO_LARGE_REPLY",
    "corrupt": "MEDIA_CORRUPT_REPLY",
    "expired": "MEDIA_EXPIRED_REPLY",
    "failed": "MEDIA_FAILED_REPLY",
    "voice_off": "VOICE_OFF_REPLY",
    "no_speech": "VOICE_UNHEARD_REPLY",
}
DEFAULT_CAPTION_SECONDS = 4.0
DEFAULT_MEDIA_QUERY = "请看我发的{kind}。"
MAX_CAPTION_SECONDS = 60.0
DEFAULT_CALLBACK_PATH = "/wxcomapp"
# The channels an app can be: the self-built app (自建应用) or the AI bot (智能机器人).
CHANNEL_APP = "app"
CHANNEL_AIBOT = "aibot"
AIBOT_MODES = ("ws", "webhook")
DEFAULT_AIBOT_WS_URL = "wss://openws.work.weixin.qq.com"
DEFAULT_AIBOT_CALLBACK_PATH = "/wxcomaibot"
# Whose Dify conversation a group-chat message continues: the member's own in that group, or
# one shared by the whole group.
GROUP_CONVERSATIONS = ("member", "group")
# Jobs mostly wait on Dify (5-30 s for a real model): a wide pool of waiting threads is cheap.
DEFAULT_JOB_WORKERS = 64
# Paths the bridge serves itself; a callback path may not take them.
OPS_PATHS = ("/healthz", "/readyz", "/metrics", "/api")

_TOKEN_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
API_TOKEN_MIN_LENGTH = 16
RESERVED_PREFIXES = ("/api/",)
_PATH_RE = re.compile(r"^/[A-Za-z0-9._~/-]*$")


@dataclass(frozen=True)
class Replies:
    """What the bridge itself says to members, and the words that reset a conversation."""

    reset_words: tuple[str, ...] = DEFAULT_RESET_WORDS
    reset_reply: str = DEFAULT_RESET_REPLY
    fallback_reply: str = DEFAULT_FALLBACK
    unsupported_reply: str = DEFAULT_UNSUPPORTED  # "" = stay silent
    welcome_text: str = ""  # "" = no welcome when a member enters the app
    paused_reply: str = DEFAULT_PAUSED  # a workflow paused for human input
    truncated_notice: str = DEFAULT_TRUNCATED  # ends an answer cut to the channel's max parts
    # Refused media, by reason (see DEFAULT_MEDIA_REPLIES); "" = stay silent.
    media_replies: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_MEDIA_REPLIES))
    voice_echo: str = ""  # e.g. "识别为：{text}", sent before the answer to a voice note

    def media_reply(self, reason: str, **values: str) -> str:
        """The member's text for refused media, its {kind} and {limit} filled in."""
        template = self.media_replies.get(reason, self.media_replies.get("failed", ""))
        try:
            return template.format(**{"kind": "", "limit": "", **values})
        except (KeyError, IndexError, ValueError):
            return template  # an operator's text with other braces: as written


DEFAULT_MEDIA_LINK_TEXT = "{name}：{url}"
DEFAULT_MEDIA_TOO_LARGE_TEXT = "文件过大，请在此查看：{url}"
DEFAULT_MEDIA_REFUSED_TEXT = "此文件无法发送（{name}）。"
# The apps file's keys of MediaSettings (BRIDGE_<KEY> in the environment).
MEDIA_KEYS = (
    "media_out",
    "media_timeout",
    "media_link_text",
    "media_too_large_text",
    "media_refused_text",
)


@dataclass(frozen=True)
class MediaSettings:
    """Media both ways. In: how an app takes the images, files and voice notes members send.
    Out: Dify's images and files in answers, sent as WeCom image/file messages or as a link
    (the texts take {name}, the file's name or alt text, and {url}, its absolute link)."""

    # An image or file followed within this many seconds by a text of the same member is
    # one question (0: never wait).
    caption_seconds: float = DEFAULT_CAPTION_SECONDS
    # The question when the member sent media without a word ({kind}: 图片/文件).
    default_query: str = DEFAULT_MEDIA_QUERY
    enabled: bool = True  # False: every file of an answer is sent as a link
    timeout: float = 30.0  # seconds to download one file from Dify, at most
    link_text: str = DEFAULT_MEDIA_LINK_TEXT  # what a file becomes when it cannot be sent
    too_large_text: str = DEFAULT_MEDIA_TOO_LARGE_TEXT  # over WeCom's 20 MB file limit
    refused_text: str = DEFAULT_MEDIA_REFUSED_TEXT  # an unsafe address, or not what it claims


def _media_settings(env: Mapping[str, str]) -> MediaSettings:
    caption = _float(env, "BRIDGE_MEDIA_CAPTION_SECONDS", DEFAULT_CAPTION_SECONDS, 0.0)
    if caption > MAX_CAPTION_SECONDS:
        raise ConfigError(
            "BRIDGE_MEDIA_CAPTION_SECONDS", f"must be at most {MAX_CAPTION_SECONDS:g} seconds"
        )
    return MediaSettings(
        caption_seconds=caption,
        default_query=env.get("BRIDGE_MEDIA_DEFAULT_QUERY", "").strip() or DEFAULT_MEDIA_QUERY,
        enabled=_bool(env, "BRIDGE_MEDIA_OUT", True),
        timeout=_float(env, "BRIDGE_MEDIA_TIMEOUT", 30.0, 1.0),
        link_text=_media_text(env, "BRIDGE_MEDIA_LINK_TEXT", DEFAULT_MEDIA_LINK_TEXT),
        too_large_text=_media_text(
            env, "BRIDGE_MEDIA_TOO_LARGE_TEXT", DEFAULT_MEDIA_TOO_LARGE_TEXT
        ),
        refused_text=_media_text(env, "BRIDGE_MEDIA_REFUSED_TEXT", DEFAULT_MEDIA_REFUSED_TEXT),
    )


def _media_text(env: Mapping[str, str], name: str, default: str) -> str:
    """A member-facing text with {name}/{url} fields; never empty (a file is never silence)."""
    value = env.get(name, "").strip() or default
    try:
        value.format(name="x", url="y")
    except (KeyError, IndexError, ValueError):
        raise ConfigError(name, "may use only the fields {name} and {url}") from None
    return value


@dataclass(frozen=True)
class AibotSettings:
    """The AI bot (智能机器人) side of an app: how it connects and how it streams."""

    mode: str  # ws: the bridge holds a long connection; webhook: WeCom calls callback_path
    bot_id: str
    secret: str = field(repr=False)  # ws mode
    ws_url: str = DEFAULT_AIBOT_WS_URL
    token: str = field(default="", repr=False)  # webhook mode
    encoding_aes_key: str = field(default="", repr=False)  # webhook mode
    group_conversation: str = "member"
    member_input: str = "member"  # the Dify input that gets the member's id, when declared
    stream_interval: float = 0.5  # at most one stream update per this many seconds
    keepalive_seconds: float = 60.0  # an update this often even when Dify says nothing new


@dataclass(frozen=True)
class AppConfig:
    """One WeCom channel instance (a self-built app or an AI bot) and the Dify app that
    answers for it. An AI bot has no corp id, agent id, secret, token or AES key of a
    self-built app: those fields are empty, and `agent_id` names the bot's conversations."""

    name: str
    corp_id: str
    agent_id: str
    secret: str = field(repr=False)
    token: str = field(repr=False)
    encoding_aes_key: str = field(repr=False)
    callback_path: str
    # None only when loaded with require_dify=False (the `send` CLI needs no Dify).
    dify: DifySettings | None = field(repr=False)
    reply_msgtype: str = "text"
    replies: Replies = Replies()
    channel: str = CHANNEL_APP
    aibot: AibotSettings | None = None
    media: MediaSettings = MediaSettings()

    @property
    def takes_callbacks(self) -> bool:
        """Whether WeCom calls this app at `callback_path` (not an AI bot on a long link)."""
        return self.aibot is None or self.aibot.mode == "webhook"


DEFAULT_KF_CALLBACK_PATH = "/wxcomkf"
DEFAULT_KF_HANDOVER_WORDS = ("人工", "转人工", "人工客服")
DEFAULT_KF_HANDOVER_REPLY = "好的，正在为您转接人工客服，请稍候。"
KF_STARTS = ("now", "history")
# The conversation key's "agent" part for kf: conversations are per kf account and customer.
KF_AGENT = "kf"


@dataclass(frozen=True)
class KfConfig:
    """The 微信客服 (kf) channel: external WeChat customers, answered by the same Dify app.

    Off unless WECOM_KF_SECRET is set; then its callback settings are required too."""

    corp_id: str
    secret: str = field(repr=False)
    token: str = field(repr=False)
    encoding_aes_key: str = field(repr=False)
    callback_path: str = DEFAULT_KF_CALLBACK_PATH
    dify: DifySettings | None = field(default=None, repr=False)
    replies: Replies = Replies()
    # Words that hand the customer to a human servicer (service_state/trans to the pool).
    handover_words: tuple[str, ...] = DEFAULT_KF_HANDOVER_WORDS
    handover_reply: str = DEFAULT_KF_HANDOVER_REPLY  # "" = hand over without a word
    # "now": an empty store starts at the messages of the callback that woke it, not at
    # WeCom's three days of history ("history").
    start: str = "now"
    name: str = "kf"  # the store's app name of kf jobs

    def pipeline_app(self) -> AppConfig:
        """The kf channel as the job pipeline sees an app (conversation keys, replies, Dify)."""
        return AppConfig(
            name=self.name,
            corp_id=self.corp_id,
            agent_id=KF_AGENT,
            secret=self.secret,
            token=self.token,
            encoding_aes_key=self.encoding_aes_key,
            callback_path=self.callback_path,
            dify=self.dify,
            replies=self.replies,
        )


@dataclass(frozen=True)
class BridgeConfig:
    apps: tuple[AppConfig, ...]
    wecom_api_base: str = DEFAULT_API_BASE
    data_dir: Path = Path("/var/lib/wecom-bridge")
    listen: str = "127.0.0.1:8000"
    web_workers: int = 1
    web_threads: int = 64
    job_workers: int = DEFAULT_JOB_WORKERS
    max_body_bytes: int = 64 * 1024
    dedupe_ttl_seconds: float = 48 * 3600
    job_retention_seconds: float = 7 * 24 * 3600
    send_max_age_seconds: float = 3600
    db_busy_timeout: float = 2.0
    # Callbacks are refused (503, WeCom redelivers) while the data dir has less free space.
    min_free_bytes: int = 64 * 2**20
    # After 40001/60020 gettoken is not called again for this long (WeCom blocks hammering).
    config_error_cooldown: float = 60.0
    log_format: str = "text"
    log_level: str = "INFO"
    # Bearer token of the send API (POST /api/v1/messages); None: the API is disabled (404).
    api_token: str | None = field(default=None, repr=False)
    # postgresql://… : the store is PostgreSQL, shared by every bridge pointed at it; None:
    # SQLite in data_dir. Not in repr: the URL may carry the password.
    database_url: str | None = field(default=None, repr=False)
    db_pool_size: int = 8  # PostgreSQL connections per process
    kf: KfConfig | None = None  # None: the 微信客服 channel is off


# --- small validated readers ------------------------------------------------------------------


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise MissingSettingError(name, "is required but not set")
    return value


_N = TypeVar("_N", int, float)


def _number(env: Mapping[str, str], name: str, default: _N, minimum: _N, kind: type[_N]) -> _N:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError as exc:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(name, f"must be {what}, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    return _number(env, name, default, minimum, int)


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    return _number(env, name, default, minimum, float)


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip() or default
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _url(value: str, name: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ConfigError(name, f"must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def parse_listen(value: str, name: str, *, empty_host: str | None = None) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:8000`) as (host, port); ConfigError names `name`.

    A bare `:port` is refused unless `empty_host` says which host it means."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or (empty_host or "")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(name, f"must be host:port, got {value!r}")
    return host, int(port)


def _listen(value: str, name: str) -> str:
    parse_listen(value, name)
    return value


def check_app_secrets(prefix: str, corp_id: str, agent_id: str, token: str, aes_key: str) -> None:
    check_corp_id(f"{prefix}CORP_ID", corp_id)
    if not agent_id.isdigit():
        raise ConfigError(f"{prefix}AGENT_ID", f"must be the numeric AgentId, got {agent_id!r}")
    check_callback_secrets(prefix, token, aes_key)


def check_corp_id(name: str, corp_id: str) -> None:
    if not re.match(r"^[A-Za-z0-9_-]{1,64}$", corp_id):
        raise ConfigError(name, "must be the corp id from 我的企业 (letters and digits)")


def check_callback_secrets(prefix: str, token: str, aes_key: str) -> None:
    if not _TOKEN_RE.match(token):
        raise ConfigError(
            f"{prefix}TOKEN", "must be 1-32 letters or digits (as the console generates)"
        )
    try:
        parse_encoding_aes_key(aes_key)
    except ValueError as exc:
        raise ConfigError(f"{prefix}ENCODING_AES_KEY", f"{exc}") from None


def check_callback_path(value: str, name: str) -> str:
    """The callback-path rule (the Ansible role runs `check-config` rather than copying it)."""
    if not _PATH_RE.match(value) or value in OPS_PATHS or value.startswith(RESERVED_PREFIXES):
        raise ConfigError(name, f"must be a URL path like /wxcomapp, got {value!r}")
    return value


def _words(raw: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None or not raw.strip():
        return default
    return tuple(word.strip() for word in raw.split("|") if word.strip())


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"must be true or false, got {raw!r}")


def _json_object(env: Mapping[str, str], name: str) -> dict[str, object]:
    raw = env.get(name, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(name, f"must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(name, f"must be a JSON object, got {type(value).__name__}")
    return value


_INPUT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")


def _dify_settings(get: Mapping[str, str], prefix: str = "DIFY_") -> DifySettings:
    mode = get.get(f"{prefix}APP_MODE", "").strip() or None
    if mode is not None and mode not in APP_MODES:
        raise ConfigError(f"{prefix}APP_MODE", f"must be one of {', '.join(APP_MODES)}")
    query_input = get.get(f"{prefix}QUERY_INPUT", "").strip() or "query"
    if not _INPUT_RE.match(query_input):
        raise ConfigError(
            f"{prefix}QUERY_INPUT", f"must be a Dify variable name, got {query_input!r}"
        )
    return DifySettings(
        api_base=_url(_required(get, f"{prefix}API_BASE"), f"{prefix}API_BASE"),
        api_key=_required(get, f"{prefix}API_KEY"),
        app_mode=mode,
        workflow_output=get.get(f"{prefix}WORKFLOW_OUTPUT", "").strip() or None,
        connect_timeout=_float(get, f"{prefix}CONNECT_TIMEOUT", 5.0, 0.1),
        read_timeout=_float(get, f"{prefix}READ_TIMEOUT", 120.0, 1.0),
        max_attempts=_int(get, f"{prefix}MAX_ATTEMPTS", 3, 1),
        backoff_base=_float(get, f"{prefix}BACKOFF", 1.0),
        query_input=query_input,
        inputs=_json_object(get, f"{prefix}INPUTS"),
        recover_seconds=_float(get, f"{prefix}RECOVER_SECONDS", 120.0),
        strip_reasoning=_bool(get, f"{prefix}STRIP_REASONING", True),
        max_concurrency=_int(get, f"{prefix}MAX_CONCURRENCY", DEFAULT_MAX_CONCURRENCY, 1),
        files_url=_optional_url(get, f"{prefix}FILES_URL"),
    )


def _optional_url(get: Mapping[str, str], name: str) -> str:
    value = get.get(name, "").strip()
    return _url(value, name) if value else ""


def _replies(get: Mapping[str, str]) -> Replies:
    def text(name: str, default: str) -> str:
        return get.get(name, default)  # set-but-empty means "stay silent"

    return Replies(
        reset_words=_words(get.get("BRIDGE_RESET_WORDS"), DEFAULT_RESET_WORDS),
        reset_reply=text("BRIDGE_RESET_REPLY", DEFAULT_RESET_REPLY),
        fallback_reply=text("BRIDGE_FALLBACK_REPLY", DEFAULT_FALLBACK),
        unsupported_reply=text("BRIDGE_UNSUPPORTED_REPLY", DEFAULT_UNSUPPORTED),
        welcome_text=text("BRIDGE_WELCOME_TEXT", ""),
        paused_reply=text("BRIDGE_PAUSED_REPLY", DEFAULT_PAUSED),
        media_replies={
            reason: text(f"BRIDGE_{name}", DEFAULT_MEDIA_REPLIES[reason])
            for reason, name in MEDIA_REPLY_VARIABLES.items()
        },
        voice_echo=text("BRIDGE_VOICE_ECHO", ""),
        truncated_notice=text("BRIDGE_TRUNCATED_NOTICE", DEFAULT_TRUNCATED),
    )


def _api_token(env: Mapping[str, str]) -> str | None:
    value = env.get("BRIDGE_API_TOKEN", "").strip()
    if not value:
        return None
    if len(value) < API_TOKEN_MIN_LENGTH or any(c.isspace() for c in value):
        # The length only: the value itself is a secret.
        raise ConfigError(
            "BRIDGE_API_TOKEN",
            f"must be at least {API_TOKEN_MIN_LENGTH} characters without spaces "
            f"(got {len(value)}); e.g. `openssl rand -hex 32`",
        )
    return value


def _aibot_settings(env: Mapping[str, str]) -> AibotSettings:
    mode = _choice(env, "WECOM_AIBOT_MODE", "ws", AIBOT_MODES)
    ws_url = env.get("WECOM_AIBOT_WS_URL", "").strip() or DEFAULT_AIBOT_WS_URL
    if not re.match(r"^wss?://[^/\s]+", ws_url):
        raise ConfigError("WECOM_AIBOT_WS_URL", f"must be a wss:// (or ws://) URL, got {ws_url!r}")
    member_input = env.get("WECOM_AIBOT_MEMBER_INPUT", "member").strip()
    if member_input and not _INPUT_RE.match(member_input):
        raise ConfigError(
            "WECOM_AIBOT_MEMBER_INPUT", f"must be a Dify variable name, got {member_input!r}"
        )
    common = AibotSettings(
        mode=mode,
        bot_id=env.get("WECOM_AIBOT_BOT_ID", "").strip(),
        secret="",
        ws_url=ws_url.rstrip("/"),
        group_conversation=_choice(
            env, "WECOM_AIBOT_GROUP_CONVERSATION", "member", GROUP_CONVERSATIONS
        ),
        member_input=member_input,
        stream_interval=_float(env, "WECOM_AIBOT_STREAM_INTERVAL", 0.5, 0.1),
        keepalive_seconds=_float(env, "WECOM_AIBOT_KEEPALIVE_SECONDS", 60.0, 1.0),
    )
    if mode == "ws":
        return dataclasses.replace(
            common,
            bot_id=_required(env, "WECOM_AIBOT_BOT_ID"),
            secret=_required(env, "WECOM_AIBOT_SECRET"),
        )
    token = _required(env, "WECOM_AIBOT_TOKEN")
    aes_key = _required(env, "WECOM_AIBOT_ENCODING_AES_KEY")
    if not _TOKEN_RE.match(token):
        raise ConfigError("WECOM_AIBOT_TOKEN", "must be 1-32 letters or digits")
    try:
        parse_encoding_aes_key(aes_key)
    except ValueError as exc:
        raise ConfigError("WECOM_AIBOT_ENCODING_AES_KEY", f"{exc}") from None
    return dataclasses.replace(common, token=token, encoding_aes_key=aes_key)


def aibot_from_env(env: Mapping[str, str], *, require_dify: bool = True) -> AppConfig:
    """The AI bot of WECOM_AIBOT_*: none of the self-built app's variables are needed."""
    aibot = _aibot_settings(env)
    callback_path = ""
    if aibot.mode == "webhook":
        callback_path = check_callback_path(
            env.get("WECOM_AIBOT_CALLBACK_PATH", "").strip() or DEFAULT_AIBOT_CALLBACK_PATH,
            "WECOM_AIBOT_CALLBACK_PATH",
        )
    return AppConfig(
        name="aibot",
        corp_id="",
        # The bot's Dify conversations are kept apart from every self-built app's.
        agent_id=f"aibot:{aibot.bot_id or callback_path}",
        secret="",
        token="",
        encoding_aes_key="",
        callback_path=callback_path,
        dify=_dify_settings(env) if require_dify else None,
        reply_msgtype="markdown",
        replies=_replies(env),
        media=_media_settings(env),
        channel=CHANNEL_AIBOT,
        aibot=aibot,
    )


def database_url(env: Mapping[str, str]) -> str | None:
    """BRIDGE_DATABASE_URL, checked (None: unset, SQLite)."""
    value = env.get("BRIDGE_DATABASE_URL", "").strip()
    if not value:
        return None
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in ("postgresql", "postgres"):
        # The scheme only: the rest may hold a password.
        raise ConfigError(
            "BRIDGE_DATABASE_URL",
            f"must be a postgresql:// URL (got scheme {scheme or 'none'!r}); unset it for SQLite "
            "in BRIDGE_DATA_DIR",
        )
    return value


def app_from_env(env: Mapping[str, str], *, require_dify: bool = True) -> AppConfig:
    corp_id = _required(env, "WECOM_CORP_ID")
    agent_id = _required(env, "WECOM_AGENT_ID")
    token = _required(env, "WECOM_TOKEN")
    aes_key = _required(env, "WECOM_ENCODING_AES_KEY")
    check_app_secrets("WECOM_", corp_id, agent_id, token, aes_key)
    return AppConfig(
        name="default",
        corp_id=corp_id,
        agent_id=agent_id,
        secret=_required(env, "WECOM_SECRET"),
        token=token,
        encoding_aes_key=aes_key,
        callback_path=check_callback_path(
            env.get("BRIDGE_CALLBACK_PATH", "").strip() or DEFAULT_CALLBACK_PATH,
            "BRIDGE_CALLBACK_PATH",
        ),
        dify=_dify_settings(env) if require_dify else None,
        reply_msgtype=_choice(env, "BRIDGE_REPLY_MSGTYPE", "text", ("text", "markdown")),
        replies=_replies(env),
        media=_media_settings(env),
    )


_WECOM_KEYS = ("CORP_ID", "AGENT_ID", "SECRET", "TOKEN", "ENCODING_AES_KEY")
_AIBOT_KEYS = (
    "MODE",
    "BOT_ID",
    "SECRET",
    "WS_URL",
    "TOKEN",
    "ENCODING_AES_KEY",
    "CALLBACK_PATH",
    "GROUP_CONVERSATION",
    "MEMBER_INPUT",
    "STREAM_INTERVAL",
    "KEEPALIVE_SECONDS",
)
_APP_KEYS = frozenset(
    [k.lower() for k in _WECOM_KEYS]
    + [f"aibot_{k.lower()}" for k in _AIBOT_KEYS]
    + [
        "channel",
        "callback_path",
        "reply_msgtype",
        "reset_words",
        "reset_reply",
        "fallback_reply",
        "unsupported_reply",
        "welcome_text",
        "paused_reply",
        "voice_echo",
        "media_caption_seconds",
        "media_default_query",
        *(name.lower() for name in MEDIA_REPLY_VARIABLES.values()),
        "truncated_notice",
    ]
    + [
        f"dify_{k}"
        for k in (
            "api_base",
            "api_key",
            "app_mode",
            "workflow_output",
            "connect_timeout",
            "read_timeout",
            "max_attempts",
            "backoff",
            "query_input",
            "inputs",
            "recover_seconds",
            "strip_reasoning",
            "files_url",
        )
    ]
    + list(MEDIA_KEYS)
)


def _app_from_table(
    table: Mapping[str, object], env: Mapping[str, str], index: int, *, require_dify: bool = True
) -> AppConfig:
    """One `[[app]]` table of the apps file; keys are the env names without prefix, lowercase.

    Missing keys fall back to the environment (e.g. one corp id or one Dify for all apps).
    """
    where = f"BRIDGE_APPS_FILE [[app]] #{index + 1}"
    merged: dict[str, str] = dict(env)
    for key, value in table.items():
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where} {key}", "must be a string or number")
        if key in ("name", "channel"):
            continue
        if key not in _APP_KEYS:
            raise ConfigError(
                f"{where} {key}", f"unknown key; known: {', '.join(sorted(_APP_KEYS))}"
            )
        upper = key.upper()
        if upper.startswith("DIFY_"):
            target = upper
        elif upper.startswith("AIBOT_") or upper in _WECOM_KEYS:
            target = f"WECOM_{upper}"
        else:
            target = f"BRIDGE_{upper}"
        merged[target] = str(value)
    name = str(table.get("name", f"app{index + 1}"))
    channel = str(table.get("channel", CHANNEL_APP))
    if channel not in (CHANNEL_APP, CHANNEL_AIBOT):
        raise ConfigError(f"{where} channel", f"must be {CHANNEL_APP} or {CHANNEL_AIBOT}")
    read = aibot_from_env if channel == CHANNEL_AIBOT else app_from_env
    try:
        app = read(merged, require_dify=require_dify)
    except ConfigError as exc:
        raise type(exc)(f"{where} ({name}): {exc.variable}", exc.problem) from None
    return dataclasses.replace(app, name=name)


def apps_from_file(
    path: Path, env: Mapping[str, str], *, require_dify: bool = True
) -> tuple[AppConfig, ...]:
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("BRIDGE_APPS_FILE", f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP:
        raise ConfigError("BRIDGE_APPS_FILE", f"{path} holds secrets: make it mode 0600 or 0640")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("BRIDGE_APPS_FILE", f"{path} is not valid TOML: {exc}") from None
    tables = doc.get("app")
    if not isinstance(tables, list) or not tables:
        raise ConfigError("BRIDGE_APPS_FILE", f"{path} must contain at least one [[app]] table")
    apps = tuple(
        _app_from_table(t, env, i, require_dify=require_dify) for i, t in enumerate(tables)
    )
    paths = [a.callback_path for a in apps if a.takes_callbacks]
    if len(set(paths)) != len(paths):
        raise ConfigError("BRIDGE_APPS_FILE", "every [[app]] needs its own callback_path")
    return apps


def load_apps(env: Mapping[str, str], *, require_dify: bool = True) -> tuple[AppConfig, ...]:
    """The configured apps, from BRIDGE_APPS_FILE or else the environment (one app).

    The service, `send`, `doctor` and `simulate` all read apps through here."""
    apps_file = env.get("BRIDGE_APPS_FILE", "").strip()
    if apps_file:
        return apps_from_file(Path(apps_file), env, require_dify=require_dify)
    apps: list[AppConfig] = []
    with_aibot = bool(env.get("WECOM_AIBOT_MODE", "").strip())
    with_kf = bool(env.get("WECOM_KF_SECRET", "").strip())
    # The self-built app is configured unless only other channels are: then none of its
    # variables is required (kf shares WECOM_CORP_ID only). With no channel at all, the
    # self-built app's first missing variable is named.
    given = {k: bool(env.get(f"WECOM_{k}", "").strip()) for k in ("CORP_ID", "AGENT_ID")}
    if given["AGENT_ID"] or (given["CORP_ID"] and not with_kf) or not (with_aibot or with_kf):
        apps.append(app_from_env(env, require_dify=require_dify))
    if with_aibot:
        apps.append(aibot_from_env(env, require_dify=require_dify))
    if len(apps) == 2 and apps[0].callback_path == apps[1].callback_path:
        raise ConfigError("WECOM_AIBOT_CALLBACK_PATH", "must differ from BRIDGE_CALLBACK_PATH")
    return tuple(apps)


def kf_from_env(
    env: Mapping[str, str], apps: tuple[AppConfig, ...], *, require_dify: bool = True
) -> KfConfig | None:
    """The kf channel, when WECOM_KF_SECRET is set (none of its variables is required else)."""
    secret = env.get("WECOM_KF_SECRET", "").strip()
    if not secret:
        return None
    corp_id = _required(env, "WECOM_CORP_ID")
    token = _required(env, "WECOM_KF_TOKEN")
    aes_key = _required(env, "WECOM_KF_ENCODING_AES_KEY")
    check_corp_id("WECOM_CORP_ID", corp_id)
    check_callback_secrets("WECOM_KF_", token, aes_key)  # the kf callback's own
    path = check_callback_path(
        env.get("WECOM_KF_CALLBACK_PATH", "").strip() or DEFAULT_KF_CALLBACK_PATH,
        "WECOM_KF_CALLBACK_PATH",
    )
    if path in {app.callback_path for app in apps}:
        raise ConfigError("WECOM_KF_CALLBACK_PATH", f"{path} is an app's callback path already")
    if any(app.name == "kf" for app in apps):
        raise ConfigError("BRIDGE_APPS_FILE", "the app name 'kf' is the 微信客服 channel's")
    replies = dataclasses.replace(_replies(env), welcome_text=env.get("WECOM_KF_WELCOME_TEXT", ""))
    return KfConfig(
        corp_id=corp_id,
        secret=secret,
        token=token,
        encoding_aes_key=aes_key,
        callback_path=path,
        dify=_dify_settings(env) if require_dify else None,
        replies=replies,
        handover_words=_words(env.get("WECOM_KF_HANDOVER_WORDS"), DEFAULT_KF_HANDOVER_WORDS),
        handover_reply=env.get("WECOM_KF_HANDOVER_REPLY", DEFAULT_KF_HANDOVER_REPLY),
        start=_choice(env, "WECOM_KF_START", "now", KF_STARTS),
    )


def pick_app(apps: tuple[AppConfig, ...], name: str | None) -> AppConfig:
    """The app called `name`, or the only one; ConfigError (naming --app) otherwise."""
    names = ", ".join(app.name for app in apps)
    if name is None:
        if len(apps) == 1:
            return apps[0]
        raise ConfigError("--app", f"several apps are configured, name one: {names}")
    for app in apps:
        if app.name == name:
            return app
    raise ConfigError("--app", f"no app named {name!r}; configured: {names}")


def wecom_api_base(env: Mapping[str, str]) -> str:
    return _url(env.get("WECOM_API_BASE", "").strip() or DEFAULT_API_BASE, "WECOM_API_BASE")


def load_config(env: Mapping[str, str] | None = None, *, require_dify: bool = True) -> BridgeConfig:
    """The whole configuration. `require_dify=False` (the `send` CLI) skips the DIFY_* settings:
    they are neither required nor validated, and every app's `dify` is None."""
    env = os.environ if env is None else env
    apps = load_apps(env, require_dify=require_dify)
    return BridgeConfig(
        apps=apps,
        kf=kf_from_env(env, apps, require_dify=require_dify),
        wecom_api_base=wecom_api_base(env),
        data_dir=Path(env.get("BRIDGE_DATA_DIR", "").strip() or "/var/lib/wecom-bridge"),
        listen=_listen(env.get("BRIDGE_LISTEN", "").strip() or "127.0.0.1:8000", "BRIDGE_LISTEN"),
        web_workers=_int(env, "BRIDGE_WEB_WORKERS", 1, 1),
        web_threads=_int(env, "BRIDGE_WEB_THREADS", 64, 1),
        job_workers=_int(env, "BRIDGE_JOB_WORKERS", DEFAULT_JOB_WORKERS, 1),
        max_body_bytes=_int(env, "BRIDGE_MAX_BODY_BYTES", 64 * 1024, 1024),
        dedupe_ttl_seconds=_float(env, "BRIDGE_DEDUPE_TTL_HOURS", 48.0, 1.0) * 3600,
        job_retention_seconds=_float(env, "BRIDGE_JOB_RETENTION_DAYS", 7.0, 0.0) * 86400,
        send_max_age_seconds=_float(env, "BRIDGE_SEND_MAX_AGE_MINUTES", 60.0, 1.0) * 60,
        db_busy_timeout=_float(env, "BRIDGE_DB_BUSY_TIMEOUT", 2.0, 0.05),
        min_free_bytes=_int(env, "BRIDGE_MIN_FREE_MB", 64) * 2**20,
        config_error_cooldown=_float(env, "WECOM_CONFIG_ERROR_COOLDOWN", 60.0, 1.0),
        log_format=_choice(env, "BRIDGE_LOG_FORMAT", "text", ("text", "json")),
        log_level=_choice(env, "BRIDGE_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        api_token=_api_token(env),
        database_url=database_url(env),
        db_pool_size=_int(env, "BRIDGE_DB_POOL_SIZE", 8, 2),
    )
