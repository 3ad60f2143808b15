"""Configuration: every bad value stops startup naming the variable; secrets stay out of errors."""

import os
from pathlib import Path

import pytest

from wecom_bridge.config import load_config
from wecom_bridge.errors import ConfigError

AES = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"


def base_env(**overrides: str) -> dict[str, str]:
    env = {
        "WECOM_CORP_ID": "ww0123456789abcdef",
        "WECOM_AGENT_ID": "1000002",
        "WECOM_SECRET": "s3cr3t-value-that-must-not-leak",
        "WECOM_TOKEN": "QDG6eK",
        "WECOM_ENCODING_AES_KEY": AES,
        "DIFY_API_BASE": "http://127.0.0.1:8080/v1",
        "DIFY_API_KEY": "app-secretkey",
    }
    env.update(overrides)
    return env


def test_defaults() -> None:
    config = load_config(base_env())
    app = config.apps[0]
    assert app.callback_path == "/wxcomapp"
    assert config.wecom_api_base == "https://qyapi.weixin.qq.com"
    assert config.listen == "127.0.0.1:8000"
    assert app.replies.reset_words == ("/reset", "新对话", "重置会话")
    assert "s3cr3t" not in repr(config)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WECOM_CORP_ID", ""),
        ("WECOM_AGENT_ID", "abc"),
        ("WECOM_SECRET", ""),
        ("WECOM_TOKEN", "has space"),
        ("WECOM_ENCODING_AES_KEY", AES[:-1]),
        ("WECOM_ENCODING_AES_KEY", AES[:-1] + "*"),
        ("WECOM_API_BASE", "qyapi.weixin.qq.com"),
        ("DIFY_API_BASE", "ftp://dify"),
        ("DIFY_API_KEY", ""),
        ("DIFY_APP_MODE", "chatbot"),
        ("BRIDGE_LISTEN", "8000"),
        ("BRIDGE_CALLBACK_PATH", "wxcomapp"),
        ("BRIDGE_CALLBACK_PATH", "/readyz"),
        ("BRIDGE_JOB_WORKERS", "0"),
        ("BRIDGE_LOG_FORMAT", "xml"),
        ("BRIDGE_REPLY_MSGTYPE", "image"),
        ("DIFY_INPUTS", "dept=HR"),
        ("DIFY_INPUTS", '["HR"]'),
        ("DIFY_QUERY_INPUT", "my question"),
        ("DIFY_RECOVER_SECONDS", "-1"),
        ("DIFY_STRIP_REASONING", "maybe"),
    ],
)
def test_bad_value_names_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(base_env(**{name: value}))
    assert err.value.variable == name
    assert "s3cr3t" not in str(err.value)


def test_dify_answer_settings() -> None:
    defaults = load_config(base_env()).apps[0]
    assert defaults.dify is not None
    assert (defaults.dify.inputs, defaults.dify.query_input) == ({}, "query")
    assert defaults.dify.recover_seconds == 120 and defaults.dify.strip_reasoning
    assert "人工" in defaults.replies.paused_reply
    env = base_env(
        DIFY_INPUTS='{"dept": "HR", "level": 3}',
        DIFY_QUERY_INPUT="question",
        DIFY_RECOVER_SECONDS="30",
        DIFY_STRIP_REASONING="false",
        BRIDGE_PAUSED_REPLY="请等待审批。",
    )
    app = load_config(env).apps[0]
    assert app.dify is not None
    assert app.dify.inputs == {"dept": "HR", "level": 3}
    assert app.dify.query_input == "question"
    assert app.dify.recover_seconds == 30 and not app.dify.strip_reasoning
    assert app.replies.paused_reply == "请等待审批。"


def test_missing_variable_named() -> None:
    env = base_env()
    del env["WECOM_TOKEN"]
    with pytest.raises(ConfigError, match="WECOM_TOKEN: is required"):
        load_config(env)


def test_custom_reset_words_and_silence() -> None:
    app = load_config(base_env(BRIDGE_RESET_WORDS="重来|/new", BRIDGE_UNSUPPORTED_REPLY="")).apps[0]
    assert app.replies.reset_words == ("重来", "/new")
    assert app.replies.unsupported_reply == ""


def _apps_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "apps.toml"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


TWO_APPS = f"""
[[app]]
name = "hr"
agent_id = "1000002"
secret = "hr-secret"
token = "tokenHR"
encoding_aes_key = "{AES}"
callback_path = "/wxcomapp/hr"
dify_api_key = "app-hr"

[[app]]
name = "it"
agent_id = 1000003
secret = "it-secret"
token = "tokenIT"
encoding_aes_key = "{AES}"
callback_path = "/wxcomapp/it"
dify_api_base = "http://10.0.0.5/v1"
dify_api_key = "app-it"
"""


def test_apps_file_two_apps(tmp_path: Path) -> None:
    env = {
        "WECOM_CORP_ID": "ww1",
        "DIFY_API_BASE": "http://127.0.0.1:8080/v1",
        "BRIDGE_APPS_FILE": str(_apps_file(tmp_path, TWO_APPS)),
    }
    config = load_config(env)
    hr, it = config.apps
    assert (hr.name, hr.agent_id, hr.callback_path, hr.dify.api_key) == (
        "hr",
        "1000002",
        "/wxcomapp/hr",
        "app-hr",
    )
    assert it.dify.api_base == "http://10.0.0.5/v1"
    assert hr.corp_id == it.corp_id == "ww1"


def test_apps_file_world_readable_refused(tmp_path: Path) -> None:
    env = {
        "WECOM_CORP_ID": "ww1",
        "DIFY_API_BASE": "http://x/v1",
        "BRIDGE_APPS_FILE": str(_apps_file(tmp_path, TWO_APPS, 0o644)),
    }
    with pytest.raises(ConfigError, match="0600") as err:
        load_config(env)
    assert err.value.variable == "BRIDGE_APPS_FILE"


def test_apps_file_duplicate_paths(tmp_path: Path) -> None:
    text = TWO_APPS.replace("/wxcomapp/it", "/wxcomapp/hr")
    env = {
        "WECOM_CORP_ID": "ww1",
        "DIFY_API_BASE": "http://x/v1",
        "BRIDGE_APPS_FILE": str(_apps_file(tmp_path, text)),
    }
    with pytest.raises(ConfigError, match="own callback_path"):
        load_config(env)


def test_apps_file_bad_value_names_app_and_key(tmp_path: Path) -> None:
    text = TWO_APPS.replace('token = "tokenIT"', 'token = "bad token!"')
    env = {
        "WECOM_CORP_ID": "ww1",
        "DIFY_API_BASE": "http://x/v1",
        "BRIDGE_APPS_FILE": str(_apps_file(tmp_path, text)),
    }
    with pytest.raises(ConfigError, match=r"#2 \(it\): WECOM_TOKEN"):
        load_config(env)


def test_apps_file_unknown_key_named(tmp_path: Path) -> None:
    text = TWO_APPS.replace('secret = "it-secret"', 'secert = "it-secret"')
    env = {
        "WECOM_CORP_ID": "ww1",
        "DIFY_API_BASE": "http://x/v1",
        "BRIDGE_APPS_FILE": str(_apps_file(tmp_path, text)),
    }
    with pytest.raises(ConfigError, match="secert"):
        load_config(env)


def test_api_token_optional_and_validated() -> None:
    assert load_config(base_env()).api_token is None
    token = "0123456789abcdef-api"
    config = load_config(base_env(BRIDGE_API_TOKEN=token))
    assert config.api_token == token
    assert token not in repr(config)
    with pytest.raises(ConfigError) as err:
        load_config(base_env(BRIDGE_API_TOKEN="short-secret"))
    assert err.value.variable == "BRIDGE_API_TOKEN"
    assert "short-secret" not in str(err.value)


def test_callback_path_cannot_shadow_the_api() -> None:
    for path in ("/api", "/api/v1/messages"):
        with pytest.raises(ConfigError) as err:
            load_config(base_env(BRIDGE_CALLBACK_PATH=path))
        assert err.value.variable == "BRIDGE_CALLBACK_PATH"


def test_dify_optional_for_send_only() -> None:
    env = {k: v for k, v in base_env(DIFY_APP_MODE="bogus").items() if k != "DIFY_API_KEY"}
    with pytest.raises(ConfigError, match="DIFY_APP_MODE"):
        load_config(env)
    env.pop("DIFY_APP_MODE")
    with pytest.raises(ConfigError, match="DIFY_API_KEY"):
        load_config(env)
    env["DIFY_APP_MODE"] = "bogus"  # not even validated when Dify is not needed
    config = load_config(env, require_dify=False)
    assert config.apps[0].dify is None
    # What send needs is still required, by name.
    del env["WECOM_SECRET"]
    with pytest.raises(ConfigError, match="WECOM_SECRET: is required"):
        load_config(env, require_dify=False)


def test_apps_file_without_dify_for_send_only(tmp_path: Path) -> None:
    env = {"WECOM_CORP_ID": "ww1", "BRIDGE_APPS_FILE": str(_apps_file(tmp_path, TWO_APPS))}
    with pytest.raises(ConfigError, match="DIFY_API_BASE"):
        load_config(env)
    hr, it = load_config(env, require_dify=False).apps
    assert (hr.name, it.name, hr.dify, it.dify) == ("hr", "it", None, None)


KF = {
    "WECOM_KF_SECRET": "kf-secret",
    "WECOM_KF_TOKEN": "KfToken1",
    "WECOM_KF_ENCODING_AES_KEY": AES,
}
AIBOT = {"WECOM_AIBOT_MODE": "ws", "WECOM_AIBOT_BOT_ID": "bot1", "WECOM_AIBOT_SECRET": "bot-secret"}
DIFY = {"DIFY_API_BASE": "http://127.0.0.1:8080/v1", "DIFY_API_KEY": "app-secretkey"}
CORP = {"WECOM_CORP_ID": "ww0123456789abcdef"}


@pytest.mark.parametrize(
    ("env", "apps", "kf"),
    [
        ({**CORP, **KF, **DIFY}, [], True),  # 微信客服 alone: only the corp id of the rest
        ({**CORP, **KF, **AIBOT, **DIFY}, ["aibot"], True),
        ({**AIBOT, **DIFY}, ["aibot"], False),
        ({**base_env(), **KF}, ["default"], True),
        ({**base_env(), **AIBOT, **KF}, ["default", "aibot"], True),
    ],
)
def test_any_non_empty_set_of_channels(env: dict[str, str], apps: list[str], kf: bool) -> None:
    config = load_config(env)
    assert [app.name for app in config.apps] == apps
    assert (config.kf is not None) is kf


def test_each_channel_still_names_its_own_missing_variable() -> None:
    with pytest.raises(ConfigError, match="WECOM_CORP_ID"):
        load_config(DIFY)  # no channel at all: the self-built app's first variable
    with pytest.raises(ConfigError, match="WECOM_CORP_ID"):
        load_config({**KF, **AIBOT, **DIFY})  # kf needs the corp
    with pytest.raises(ConfigError, match="WECOM_KF_TOKEN"):
        load_config({**CORP, **DIFY, "WECOM_KF_SECRET": "kf-secret"})
    with pytest.raises(ConfigError, match="WECOM_TOKEN"):
        load_config({**CORP, **KF, **DIFY, "WECOM_AGENT_ID": "1000002"})  # the app is meant


def test_media_settings_and_the_files_base() -> None:
    default = load_config(base_env()).apps[0]
    assert default.media.enabled and default.media.timeout == 30.0
    assert default.dify.files_base == "http://127.0.0.1:8080"
    app = load_config(
        base_env(
            DIFY_FILES_URL="https://kb.example.com",
            BRIDGE_MEDIA_OUT="false",
            BRIDGE_MEDIA_TIMEOUT="10",
            BRIDGE_MEDIA_TOO_LARGE_TEXT="太大了：{url}",
        )
    ).apps[0]
    assert app.dify.files_base == "https://kb.example.com"
    assert (app.media.enabled, app.media.timeout) == (False, 10.0)
    assert app.media.too_large_text == "太大了：{url}"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DIFY_FILES_URL", "kb.example.com"),
        ("BRIDGE_MEDIA_TIMEOUT", "0.1"),
        ("BRIDGE_MEDIA_LINK_TEXT", "看 {link}"),
        ("BRIDGE_MEDIA_REFUSED_TEXT", "{0}"),
    ],
)
def test_a_bad_media_setting_is_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(base_env(**{name: value}))
    assert caught.value.variable == name


def test_apps_file_takes_media_keys(tmp_path: Path) -> None:
    text = TWO_APPS.replace(
        'dify_api_key = "app-it"', 'dify_api_key = "app-it"\nmedia_out = "false"'
    ).replace('dify_api_key = "app-hr"', 'dify_api_key = "app-hr"\ndify_files_url = "https://f.cn"')
    env = {
        "WECOM_CORP_ID": "ww1",
        "DIFY_API_BASE": "http://127.0.0.1:8080/v1",
        "BRIDGE_APPS_FILE": str(_apps_file(tmp_path, text)),
    }
    hr, it = load_config(env).apps
    assert hr.dify.files_base == "https://f.cn" and hr.media.enabled
    assert not it.media.enabled


def test_media_settings_and_texts_from_the_environment_and_the_apps_file(tmp_path):
    from conftest import AppSecrets, wecom_env

    base = {
        **wecom_env(AppSecrets(), "http://127.0.0.1:1"),
        "DIFY_API_BASE": "http://127.0.0.1:2/v1",
        "DIFY_API_KEY": "app-x",
    }
    app = load_config(
        {**base, "BRIDGE_MEDIA_CAPTION_SECONDS": "2.5", "BRIDGE_VOICE_ECHO": "听到：{text}"}
    ).apps[0]
    assert app.media.caption_seconds == 2.5 and app.replies.voice_echo == "听到：{text}"
    assert app.replies.media_reply("too_large", kind="文件", limit="15 MB").startswith(
        "文件太大（上限 15 MB）"
    )
    with pytest.raises(ConfigError, match="BRIDGE_MEDIA_CAPTION_SECONDS"):
        load_config({**base, "BRIDGE_MEDIA_CAPTION_SECONDS": "120"})
    apps = tmp_path / "apps.toml"
    apps.write_text(
        '[[app]]\nname = "hr"\nmedia_caption_seconds = 0\nmedia_type_reply = "不收{kind}"\n',
        encoding="utf-8",
    )
    apps.chmod(0o600)
    (hr,) = load_config({**base, "BRIDGE_APPS_FILE": str(apps)}).apps
    assert (
        hr.media.caption_seconds == 0 and hr.replies.media_reply("type", kind="图片") == "不收图片"
    )
