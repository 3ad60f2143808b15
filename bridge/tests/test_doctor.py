"""`wecom-bridge doctor` against the real thing on loopback: the in-process bridge, the WeCom and
Dify doubles, and an HTTPS edge with certificates from a private CA (--ca-file, --resolve)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import dify_state, free_port, wecom_state
from tls_edge import DOMAIN, CertPair, EdgeSpec, HttpsEdge, PrivateCA, StaticFile

from wecom_bridge.cli import main
from wecom_bridge.testing.server import ServerThread
from wecom_bridge.tools.doctor import CheckResult, Status, display_width, render_table
from wecom_bridge.tools.probe import der_not_after, parse_resolve, split_host_port

CODE = "Xy12AbCdEf"
WECOM_ENV = (
    "WECOM_CORP_ID",
    "WECOM_AGENT_ID",
    "WECOM_SECRET",
    "WECOM_TOKEN",
    "WECOM_ENCODING_AES_KEY",
    "WECOM_API_BASE",
    "DIFY_API_BASE",
    "DIFY_API_KEY",
    "DIFY_APP_MODE",
    "BRIDGE_CALLBACK_PATH",
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> PrivateCA:
    return PrivateCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def good_cert(ca: PrivateCA) -> CertPair:
    return ca.issue("good", (DOMAIN,), -1, 90)


def verify_files(**extra: StaticFile) -> dict[str, StaticFile]:
    return {f"/WW_verify_{CODE}.txt": StaticFile(CODE.encode()), **extra}


@pytest.fixture
def edge(good_cert: CertPair, bridge: ServerThread) -> Iterator[HttpsEdge]:
    with HttpsEdge(good_cert, EdgeSpec(files=verify_files(), upstream=bridge.url)) as server:
        yield server


@pytest.fixture
def doctor_env(monkeypatch: pytest.MonkeyPatch, bridge_env: dict[str, str]) -> dict[str, str]:
    """The doctor's environment: the same values the bridge runs with (as in the console)."""
    for name in WECOM_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in bridge_env.items():
        monkeypatch.setenv(name, value)
    return bridge_env


def run_doctor(
    capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, dict[str, dict[str, str]]]:
    code = main(["doctor", "--json", "--timeout", "3", *args])
    results = json.loads(capsys.readouterr().out)
    return code, {r["name"]: r for r in results}


def edge_args(edge: HttpsEdge, ca: PrivateCA, *more: str) -> list[str]:
    return [
        "--domain",
        edge.domain,
        "--resolve",
        edge.resolve,
        "--ca-file",
        str(ca.ca_file),
        "--verify-code",
        CODE,
        *more,
    ]


def assert_only_failure(results: dict[str, dict[str, str]], name: str) -> dict[str, str]:
    failed = [n for n, r in results.items() if r["status"] == "FAIL"]
    assert failed == [name], results
    return results[name]


# --- all green --------------------------------------------------------------------------------


def test_all_green(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    edge: HttpsEdge,
    ca: PrivateCA,
    bridge: ServerThread,
) -> None:
    code, results = run_doctor(capsys, *edge_args(edge, ca, "--bridge-url", bridge.url))
    assert code == 0
    assert {n: r["status"] for n, r in results.items()} == {
        "dns": "PASS",
        f"verify-file {CODE}": "PASS",
        "tls": "PASS",
        "callback": "PASS",
        "wecom-gettoken": "PASS",
        "wecom-trusted-ip": "PASS",
        "dify": "PASS",
        "dify-inputs": "PASS",
        "dify-media": "PASS",
        "bridge-ready": "PASS",
    }
    assert results["dify-media"]["detail"].startswith("files: none; speech to text: off")
    assert "127.0.0.1" in results["dns"]["detail"]
    assert "89 days left" in results["tls"]["detail"]
    assert "mode chat" in results["dify"]["detail"]
    assert set(results["dns"]) == {"name", "status", "detail", "hint"}


def test_table_output_and_exit_code(
    capsys: pytest.CaptureFixture[str], doctor_env: dict[str, str], edge: HttpsEdge, ca: PrivateCA
) -> None:
    args = ["doctor", *edge_args(edge, ca), "--verify-code", "missing1"]
    assert main(args) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["STATUS", "CHECK", "DETAIL"]
    detail_column = lines[0].index("DETAIL")
    assert all(line[detail_column - 2 : detail_column] == "  " for line in lines[1:9] if line)
    assert any(line.startswith("FAIL    verify-file missing1") for line in lines)
    assert "↳ serve WW_verify_missing1.txt at the root" in out
    assert "SKIP    bridge-ready" in out
    assert out.rstrip().endswith("9 passed, 1 failed, 1 skipped")


def test_nothing_configured_skips_everything(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in WECOM_ENV:
        monkeypatch.delenv(name, raising=False)
    code, results = run_doctor(capsys)
    assert code == 0
    assert {r["status"] for r in results.values()} == {"SKIP"}
    assert all(r["hint"] for r in results.values())


# --- callback failures ------------------------------------------------------------------------


def test_wrong_token(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    edge: HttpsEdge,
    ca: PrivateCA,
) -> None:
    monkeypatch.setenv("WECOM_TOKEN", "SomeOtherToken9")
    code, results = run_doctor(capsys, *edge_args(edge, ca))
    assert code == 1
    failure = assert_only_failure(results, "callback")
    assert "403" in failure["detail"] and "signature" in failure["detail"]
    assert "WECOM_TOKEN differs" in failure["hint"]


def test_wrong_corp_id_told_apart_from_token(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    bridge: ServerThread,
) -> None:
    monkeypatch.setenv("WECOM_CORP_ID", "wwothercorp")
    code, results = run_doctor(capsys, "--callback-url", f"{bridge.url}/wxcomapp")
    assert code == 1
    assert "another corp" in results["callback"]["detail"]
    assert "WECOM_CORP_ID differs" in results["callback"]["hint"]
    assert "WECOM_CORP_ID is wrong" in results["wecom-gettoken"]["hint"]  # 40013


def test_wrong_aes_key(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    bridge: ServerThread,
) -> None:
    monkeypatch.setenv("WECOM_ENCODING_AES_KEY", "Z" * 43)
    _, results = run_doctor(capsys, "--callback-url", f"{bridge.url}/wxcomapp")
    failure = assert_only_failure(results, "callback")
    assert "400" in failure["detail"]
    assert "WECOM_ENCODING_AES_KEY differs" in failure["hint"]


def test_wrong_path(
    capsys: pytest.CaptureFixture[str], doctor_env: dict[str, str], bridge: ServerThread
) -> None:
    _, results = run_doctor(capsys, "--callback-url", f"{bridge.url}/wecom")
    failure = assert_only_failure(results, "callback")
    assert "404" in failure["detail"]
    assert "wrong path, or a proxy rewrote it" in failure["hint"]


def test_proxy_rewrites_the_path(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    good_cert: CertPair,
    ca: PrivateCA,
    bridge: ServerThread,
) -> None:
    spec = EdgeSpec(files=verify_files(), upstream=bridge.url, rewrite=lambda path: "/")
    with HttpsEdge(good_cert, spec) as edge:
        _, results = run_doctor(capsys, *edge_args(edge, ca, "--bridge-url", bridge.url))
    failure = assert_only_failure(results, "callback")
    assert "while the bridge itself answers /wxcomapp" in failure["detail"]
    assert "proxy does not pass /wxcomapp through unchanged" in failure["hint"]


def test_answer_with_trailing_newline(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    good_cert: CertPair,
    ca: PrivateCA,
    bridge: ServerThread,
) -> None:
    spec = EdgeSpec(files=verify_files(), upstream=bridge.url, suffix=b"\n")
    with HttpsEdge(good_cert, spec) as edge:
        _, results = run_doctor(capsys, *edge_args(edge, ca))
    failure = assert_only_failure(results, "callback")
    assert "trailing newline" in failure["detail"]
    assert "no trailing newline" in failure["hint"]


def test_slow_answer(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    good_cert: CertPair,
    ca: PrivateCA,
    bridge: ServerThread,
) -> None:
    spec = EdgeSpec(files=verify_files(), upstream=bridge.url, delay=1.1)
    with HttpsEdge(good_cert, spec) as edge:
        _, results = run_doctor(capsys, *edge_args(edge, ca))
    failure = assert_only_failure(results, "callback")
    assert "correct answer, but after" in failure["detail"]
    assert "WeCom waits 1 s" in failure["detail"]


def test_service_down(
    capsys: pytest.CaptureFixture[str], doctor_env: dict[str, str], bridge: ServerThread
) -> None:
    port = free_port()
    code, results = run_doctor(
        capsys,
        "--callback-url",
        f"http://127.0.0.1:{port}/wxcomapp",
        "--bridge-url",
        f"http://127.0.0.1:{port}",
    )
    assert code == 1
    assert "refused" in results["callback"]["detail"]
    assert results["callback"]["hint"].startswith("service down")
    assert results["bridge-ready"]["status"] == "FAIL"
    assert "not running" in results["bridge-ready"]["hint"]


def test_upstream_down_behind_the_proxy(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    good_cert: CertPair,
    ca: PrivateCA,
) -> None:
    files = verify_files(**{"/wxcomapp": StaticFile(b"<html>502 Bad Gateway</html>", status=502)})
    with HttpsEdge(good_cert, EdgeSpec(files=files)) as edge:
        _, results = run_doctor(capsys, *edge_args(edge, ca))
    failure = assert_only_failure(results, "callback")
    assert "HTTP 502" in failure["detail"]
    assert "bridge is not running" in failure["hint"]


# --- verify file and TLS ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("served", "detail", "hint"),
    [
        (None, "404 Not Found", "add Xy12AbCdEf to nginx_wecom_verify_codes"),
        (StaticFile(CODE.encode() + b"\n"), "trailing newline", "exactly the code"),
        (StaticFile(b"\xef\xbb\xbf" + CODE.encode()), "BOM", "exactly the code"),
        (StaticFile(b"something else"), "wrong content", "exactly the code"),
        (StaticFile(CODE.encode(), "application/octet-stream"), "content type", "text/plain"),
        (
            StaticFile(b"", status=301, headers={"Location": "https://example.test/"}),
            "redirects (301)",
            "does not follow redirects",
        ),
    ],
    ids=["missing", "newline", "bom", "content", "content-type", "redirect"],
)
def test_verify_file_problems(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    good_cert: CertPair,
    ca: PrivateCA,
    bridge: ServerThread,
    served: StaticFile | None,
    detail: str,
    hint: str,
) -> None:
    files = {} if served is None else {f"/WW_verify_{CODE}.txt": served}
    with HttpsEdge(good_cert, EdgeSpec(files=files, upstream=bridge.url)) as edge:
        code, results = run_doctor(capsys, *edge_args(edge, ca))
    assert code == 1
    failure = assert_only_failure(results, f"verify-file {CODE}")
    assert detail in failure["detail"]
    assert hint in failure["hint"]


@pytest.mark.parametrize(
    ("label", "names", "days", "detail", "hint"),
    [
        ("expired", (DOMAIN,), (-30, -2), "expired 2 days ago", "renew the certificate"),
        ("expiring", (DOMAIN,), (-80, 3), "expires in 3.0 days", "renew the certificate"),
        ("otherhost", ("other.test",), (-1, 90), "not valid for wecom.test", "names include"),
    ],
)
def test_certificate_problems(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    ca: PrivateCA,
    label: str,
    names: tuple[str, ...],
    days: tuple[int, int],
    detail: str,
    hint: str,
) -> None:
    pair = ca.issue(label, names, *days)
    with HttpsEdge(pair, EdgeSpec(files=verify_files())) as edge:
        code, results = run_doctor(capsys, *edge_args(edge, ca))
    assert code == 1
    tls = results["tls"]
    assert tls["status"] == "FAIL"
    assert detail in tls["detail"], tls
    assert hint in tls["hint"]
    verify = results[f"verify-file {CODE}"]
    if label == "expiring":  # still valid: the file is served fine
        assert verify["status"] == "PASS"
    else:
        assert verify["status"] == "FAIL" and "see the tls check" in verify["hint"]


def test_untrusted_certificate(
    capsys: pytest.CaptureFixture[str], doctor_env: dict[str, str], edge: HttpsEdge
) -> None:
    _, results = run_doctor(capsys, "--domain", edge.domain, "--resolve", edge.resolve)
    assert results["tls"]["status"] == "FAIL"
    assert "does not verify" in results["tls"]["detail"]
    assert "full chain" in results["tls"]["hint"]


def test_cert_days_threshold(
    capsys: pytest.CaptureFixture[str], doctor_env: dict[str, str], edge: HttpsEdge, ca: PrivateCA
) -> None:
    _, results = run_doctor(capsys, *edge_args(edge, ca, "--cert-days", "100"))
    assert results["tls"]["status"] == "FAIL"
    assert "under --cert-days 100" in results["tls"]["detail"]


def test_domain_does_not_resolve(
    capsys: pytest.CaptureFixture[str], doctor_env: dict[str, str]
) -> None:
    _, results = run_doctor(capsys, "--domain", "no-such-host.invalid", "--timeout", "2")
    assert results["dns"]["status"] == "FAIL"
    assert "dig +short no-such-host.invalid" in results["dns"]["hint"]
    assert results["tls"]["status"] == "FAIL"


# --- WeCom API --------------------------------------------------------------------------------


def test_wrong_secret_40001(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WECOM_SECRET", "not-the-secret")
    code, results = run_doctor(capsys)
    assert code == 1
    failure = assert_only_failure(results, "wecom-gettoken")
    assert "errcode 40001" in failure["detail"]
    assert "WECOM_SECRET is wrong" in failure["hint"]
    assert results["wecom-trusted-ip"]["status"] == "SKIP"


def test_untrusted_ip_60020(
    capsys: pytest.CaptureFixture[str], doctor_env: dict[str, str], wecom_double: ServerThread
) -> None:
    wecom_state(wecom_double).fail_next("getcallbackip", 60020)
    code, results = run_doctor(capsys)
    assert code == 1
    failure = assert_only_failure(results, "wecom-trusted-ip")
    assert "203.0.113.7" in failure["detail"] and "60020" in failure["detail"]
    assert failure["hint"].startswith("add 203.0.113.7 to 企业可信IP")


def test_wecom_api_unreachable(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WECOM_API_BASE", f"http://127.0.0.1:{free_port()}")
    _, results = run_doctor(capsys)
    failure = assert_only_failure(results, "wecom-gettoken")
    assert "outbound HTTPS to WeCom's API is blocked" in failure["hint"]


# --- Dify -------------------------------------------------------------------------------------


def test_dify_unreachable(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DIFY_API_BASE", f"http://127.0.0.1:{free_port()}/v1")
    code, results = run_doctor(capsys)
    assert code == 1
    failure = assert_only_failure(results, "dify")
    assert "Dify unreachable" in failure["detail"]
    assert "start Dify" in failure["hint"]


def test_wrong_dify_key(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    dify_double: ServerThread,
) -> None:
    monkeypatch.setenv("DIFY_API_KEY", "app-wrong")
    code, results = run_doctor(capsys)
    assert code == 1
    failure = assert_only_failure(results, "dify")
    assert "401" in failure["detail"]
    assert "DIFY_API_KEY is wrong" in failure["hint"]


def test_dify_base_without_v1_and_mode_mismatch(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    dify_double: ServerThread,
) -> None:
    monkeypatch.setenv("DIFY_API_BASE", dify_double.url)
    _, results = run_doctor(capsys)
    assert "must be the Service API base ending in /v1" in results["dify"]["hint"]
    monkeypatch.setenv("DIFY_API_BASE", f"{dify_double.url}/v1")
    monkeypatch.setenv("DIFY_APP_MODE", "workflow")
    _, results = run_doctor(capsys)
    assert "DIFY_APP_MODE=workflow but the app is chat" in results["dify"]["detail"]
    assert dify_state(dify_double).requests  # really asked


# --- bridge -----------------------------------------------------------------------------------


def test_bridge_not_ready(
    capsys: pytest.CaptureFixture[str], doctor_env: dict[str, str], bridge: ServerThread
) -> None:
    bridge.app.extensions["wecom_bridge"].pool.stop()
    _, results = run_doctor(capsys, "--bridge-url", bridge.url)
    failure = assert_only_failure(results, "bridge-ready")
    assert "HTTP 503" in failure["detail"]
    assert "job process died" in failure["hint"]


# --- units ------------------------------------------------------------------------------------


def test_der_not_after_matches_the_certificate(good_cert: CertPair) -> None:
    der = ssl.PEM_cert_to_DER_cert(Path(good_cert.cert).read_text())
    assert der_not_after(der) == good_cert.not_after.replace(microsecond=0)
    assert der_not_after(b"\x30\x03garbage") is None


def test_parse_resolve_and_domain() -> None:
    assert parse_resolve("kb.example:443:203.0.113.5") == (("kb.example", 443), "203.0.113.5")
    assert parse_resolve("kb.example:8443:[::1]") == (("kb.example", 8443), "::1")
    with pytest.raises(ValueError):
        parse_resolve("kb.example:203.0.113.5")
    assert split_host_port("KB.example") == ("kb.example", 443)
    assert split_host_port("kb.example:8443") == ("kb.example", 8443)


def test_table_aligns_wide_characters() -> None:
    results = [
        CheckResult("域名", Status.PASS, "ok"),
        CheckResult("dns", Status.FAIL, "bad", "fix it"),
    ]
    lines = render_table(results).splitlines()
    assert display_width("域名") == 4
    columns = {display_width(line.split("  ok")[0]) for line in lines[1:2]}
    assert columns == {display_width(lines[2].split("  bad")[0])}
    assert lines[3].strip() == "↳ fix it"


def test_dify_required_input_without_a_value(
    capsys: pytest.CaptureFixture[str],
    doctor_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    dify_double: ServerThread,
) -> None:
    form = [{"text-input": {"variable": "dept", "label": "部门", "required": True}}]
    dify_state(dify_double).set_input_form(form)
    code, results = run_doctor(capsys)
    assert code == 1
    failure = assert_only_failure(results, "dify-inputs")
    assert "'dept' (部门)" in failure["detail"] and "DIFY_INPUTS" in failure["detail"]
    monkeypatch.setenv("DIFY_INPUTS", '{"dept": "HR", "typo": 1}')
    _, results = run_doctor(capsys)
    assert results["dify-inputs"]["status"] == "PASS"
    assert "'typo' is not an input of the app" in results["dify-inputs"]["detail"]
