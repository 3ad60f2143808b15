"""`wecom-bridge doctor` against the live stack: all green, and a wrong input turns one line red.

Doctor runs on the server from the bridge image with host networking, so it reaches the edge by
the domain (server's /etc/hosts), the WeCom double on 127.0.0.1:9001 and Dify on 127.0.0.1:8080,
as an operator running it on the server would.
"""

import json
import shlex

from conftest import DOMAIN, PEBBLE_ROOT, TEST_VARS

IMAGE = "wecom-bridge:0.1.0"


def doctor(host, *args, **env_overrides):
    env = {
        "WECOM_CORP_ID": TEST_VARS["wecom_test_corp_id"],
        "WECOM_AGENT_ID": TEST_VARS["wecom_test_agent_id"],
        "WECOM_SECRET": TEST_VARS["wecom_test_secret"],
        "WECOM_TOKEN": TEST_VARS["wecom_test_token"],
        "WECOM_ENCODING_AES_KEY": TEST_VARS["wecom_test_encoding_aes_key"],
        "WECOM_API_BASE": "http://127.0.0.1:9001",
        "DIFY_API_BASE": "http://127.0.0.1:8080/v1",
        "DIFY_API_KEY": TEST_VARS["wecom_test_dify_api_key"],
        **env_overrides,
    }
    env_args = [part for key, value in env.items() for part in ("-e", f"{key}={value}")]
    cmd = shlex.join(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "host",
            "-v",
            f"{PEBBLE_ROOT}:/ca.pem:ro",
            *env_args,
            IMAGE,
            "doctor",
            "--domain",
            DOMAIN,
            "--ca-file",
            "/ca.pem",
            "--bridge-url",
            "http://127.0.0.1:8400",
            "--json",
            *args,
        ]
    )
    res = host.run(cmd)
    return res.rc, {check["name"]: check for check in json.loads(res.stdout)}


def test_doctor_all_green(edge, host):
    rc, checks = doctor(host, "--verify-code", TEST_VARS["wecom_test_verify_code"])
    failed = {name: c for name, c in checks.items() if c["status"] != "PASS"}
    assert rc == 0 and not failed, failed
    assert {"dns", "tls", "callback", "wecom-gettoken", "dify", "bridge-ready"} <= set(checks)


def test_doctor_names_a_wrong_token(edge, host):
    rc, checks = doctor(
        host,
        "--verify-code",
        TEST_VARS["wecom_test_verify_code"],
        WECOM_TOKEN="someOtherToken",
    )
    assert rc != 0
    assert checks["callback"]["status"] == "FAIL"
    assert "token" in (checks["callback"]["detail"] + checks["callback"]["hint"]).lower()
    assert checks["tls"]["status"] == "PASS"


def test_doctor_checks_the_kf_channel(edge, host):
    kf = {
        "WECOM_KF_SECRET": TEST_VARS["wecom_test_kf_secret"],
        "WECOM_KF_TOKEN": TEST_VARS["wecom_test_kf_token"],
        "WECOM_KF_ENCODING_AES_KEY": TEST_VARS["wecom_test_kf_encoding_aes_key"],
    }
    rc, checks = doctor(host, **kf)
    assert checks["kf-callback"]["status"] == "PASS", checks["kf-callback"]
    assert checks["kf-secret"]["status"] == "PASS", checks["kf-secret"]
    rc, checks = doctor(host, **{**kf, "WECOM_KF_SECRET": "not-the-kf-secret"})
    assert rc != 0 and checks["kf-secret"]["status"] == "FAIL"
    assert "WECOM_KF_SECRET" in checks["kf-secret"]["hint"]
