"""`wecom-bridge doctor`: preflight checks of everything WeCom and Dify need, each with a fix.

Every check is a small function returning a CheckResult (PASS, FAIL or SKIP with a hint). A check
whose inputs are missing is SKIP, never a crash; the command exits 1 when any check fails.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import shutil
import socket
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from urllib.parse import urlsplit

from websockets.exceptions import InvalidHandshake, InvalidURI

from wecom_bridge.config import (
    AppConfig,
    KfConfig,
    kf_from_env,
    load_apps,
    pick_app,
    wecom_api_base,
)
from wecom_bridge.dify.client import DifyClient, DifySettings
from wecom_bridge.errors import (
    ConfigError,
    DifyError,
    MissingSettingError,
    WeComApiError,
    WeComConfigError,
)
from wecom_bridge.jobs.media import Acceptance, speech_to_text_on
from wecom_bridge.tools.probe import Fetched, ProbeError, Prober, split_host_port
from wecom_bridge.wecom.aibot_frames import AibotFrameError
from wecom_bridge.wecom.aibot_ws import probe_subscription
from wecom_bridge.wecom.api import MemoryTokenCache, WeComClient
from wecom_bridge.wecom.crypto import WeComCrypto, build_url_verification
from wecom_bridge.wecom.errcodes import hint_for
from wecom_bridge.wecom.kf_api import KfClient

WECOM_DEADLINE = 1.0  # seconds WeCom waits for the URL verification answer
BOM = b"\xef\xbb\xbf"


class Status(StrEnum):
    PASS = "PASS"  # noqa: S105 - a status, not a password
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    hint: str = ""

    def as_dict(self) -> dict[str, str]:
        return {**asdict(self), "status": str(self.status)}


def passed(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.PASS, detail)


def failed(name: str, detail: str, hint: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail, hint)


def skipped(name: str, detail: str, hint: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, detail, hint)


@dataclass(frozen=True)
class DoctorOptions:
    domain: str | None = None  # as written in the console: host or host:port
    verify_codes: tuple[str, ...] = ()
    callback_url: str | None = None  # None: https://<domain><the app's callback path>
    bridge_url: str | None = None  # internal base URL for /readyz
    cert_days: int = 14
    app: str | None = None  # which app of BRIDGE_APPS_FILE (None: the only one)
    kf_callback_url: str | None = None  # None: https://<domain><WECOM_KF_CALLBACK_PATH>
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Doctor:
    options: DoctorOptions
    prober: Prober
    results: dict[str, CheckResult] = field(default_factory=dict)
    _wecom: WeComClient | None = field(default=None, init=False, repr=False)

    def app(self, *, with_dify: bool = False) -> AppConfig:
        """The app to check, read by the service's own loader (environment or BRIDGE_APPS_FILE);
        ConfigError when the configuration does not load."""
        return pick_app(load_apps(self.options.env, require_dify=with_dify), self.options.app)

    def kf_only(self) -> bool:
        """Whether 微信客服 is the only channel (no app: the app checks do not apply)."""
        if not self.options.env.get("WECOM_KF_SECRET", "").strip():
            return False
        try:
            return load_apps(self.options.env, require_dify=False) == ()
        except ConfigError:
            return False

    def api_base(self) -> str:
        return wecom_api_base(self.options.env)

    def wecom(self) -> WeComClient:
        """One client for both WeCom checks: the second reuses the token of the first."""
        if self._wecom is None:
            app = self.app()
            self._wecom = WeComClient(
                api_base=self.api_base(),
                corp_id=app.corp_id,
                secret=app.secret,
                token_cache=MemoryTokenCache(),
                max_attempts=1,
                timeout=(3.05, self.prober.timeout),
            )
        return self._wecom

    def callback_url(self, app: AppConfig) -> str | None:
        if self.options.callback_url:
            return self.options.callback_url
        if not self.options.domain:
            return None
        return f"https://{self.options.domain}{app.callback_path}"

    def run(self) -> list[CheckResult]:
        checks: list[Callable[[Doctor], CheckResult]] = self._checks()
        for check in checks:
            result = check(self)
            self.results[result.name] = result
        return list(self.results.values())

    def _checks(self) -> list[Callable[[Doctor], CheckResult]]:
        if self.kf_only():
            return [
                check_dns,
                check_tls,
                check_kf_callback,
                check_kf_secret,
                check_dify,
                check_dify_inputs,
                check_dify_media,
                check_bridge_ready,
            ]
        try:
            aibot = self.app().aibot
        except ConfigError:
            aibot = None  # the checks below report the configuration error
        if aibot is not None and aibot.mode == "ws":
            # No domain, certificate, callback or trusted IP: the bridge connects out.
            return [
                check_aibot_subscription,
                check_dify,
                check_dify_inputs,
                check_dify_media,
                check_bridge_ready,
            ]
        if aibot is not None:
            # A webhook bot: the callback URL and its certificate, no WW_verify, gettoken or 可信IP.
            return [
                check_dns,
                check_tls,
                check_callback,
                check_dify,
                check_dify_inputs,
                check_dify_media,
                check_bridge_ready,
            ]
        checks: list[Callable[[Doctor], CheckResult]] = [check_dns]
        codes = self.options.verify_codes or ("",)
        checks += [functools.partial(check_verify_file, code=code) for code in codes]
        checks += [
            check_tls,
            check_callback,
            check_gettoken,
            check_trusted_ip,
            check_dify,
            check_dify_inputs,
            check_dify_media,
        ]
        if self.options.env.get("WECOM_KF_SECRET", "").strip():  # 微信客服 is on
            checks += [check_kf_callback, check_kf_secret]
        checks.append(check_bridge_ready)
        return checks


def _domain(doctor: Doctor, name: str) -> tuple[str, int] | CheckResult:
    domain = doctor.options.domain
    if not domain:
        return skipped(name, "no --domain given", "pass --domain <the ICP-filed domain>")
    try:
        return split_host_port(domain)
    except ValueError:
        return failed(name, f"--domain {domain!r} is not a host name", "e.g. --domain kb.example")


# --- (a) DNS -----------------------------------------------------------------------------------


def check_dns(doctor: Doctor) -> CheckResult:
    name = "dns"
    target = _domain(doctor, name)
    if isinstance(target, CheckResult):
        return target
    host, port = target
    if (host, port) in doctor.prober.resolve:
        return passed(name, f"{host} → {doctor.prober.address(host, port)} (--resolve, no DNS)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return failed(
            name,
            f"{host} does not resolve",
            f"create an A record (and AAAA if the server has IPv6) for {host} pointing at the "
            f"server's public IP; check with `dig +short {host}`",
        )
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    return passed(name, f"{host} → {', '.join(addresses)}")


# --- (b) WW_verify file ------------------------------------------------------------------------


def check_verify_file(doctor: Doctor, code: str) -> CheckResult:
    name = f"verify-file {code}" if code else "verify-file"
    if not code:
        return skipped(
            name,
            "no --verify-code given",
            "pass --verify-code CODE: the code WeCom shows when you add the trusted domain "
            "(可信域名 › 申请校验域名, file WW_verify_CODE.txt)",
        )
    target = _domain(doctor, name)
    if isinstance(target, CheckResult):
        return target
    url = f"https://{doctor.options.domain}/WW_verify_{code}.txt"
    fix = (
        f"serve WW_verify_{code}.txt at the root of the domain with exactly the code as content: "
        f"add {code} to nginx_wecom_verify_codes and run the playbook again"
    )
    try:
        got = doctor.prober.get(url)
    except ProbeError as exc:
        return failed(name, f"{url}: {exc}", _probe_hint(exc, "https"))
    if 300 <= got.status < 400:
        where = got.headers.get("Location", "?")
        return failed(
            name,
            f"{url} redirects ({got.status}) to {where}",
            "WeCom does not follow redirects: answer the file directly over https at the root",
        )
    if got.status == 404:
        return failed(name, f"{url}: 404 Not Found", fix + " (a file under a sub-path fails)")
    if got.status != 200:
        return failed(name, f"{url}: HTTP {got.status}", fix)
    problem = _content_problem(got.body, code.encode())
    if problem:
        return failed(
            name,
            f"{url}: {problem}",
            f"the file must contain exactly the code: `printf %s {code} > WW_verify_{code}.txt`",
        )
    if not got.content_type.startswith("text/plain"):
        return failed(
            name,
            f"{url}: content type {got.content_type or 'missing'}",
            "serve .txt files as text/plain (nginx: `default_type text/plain;` or the mime.types "
            "include in that location)",
        )
    return passed(name, f"{url} answers the code ({got.content_type})")


def _content_problem(body: bytes, expected: bytes) -> str:
    """Why `body` is not exactly `expected` (BOM, newline, quotes, other content); "" if it is."""
    if body == expected:
        return ""
    if body.startswith(BOM):
        return "starts with a UTF-8 BOM"
    if body.rstrip(b"\r\n") == expected:
        return f"has a trailing newline ({body[len(expected) :]!r})"
    if body.strip() == expected:
        return "has surrounding whitespace"
    if body.strip().strip(b"\"'") == expected:
        return "is quoted"
    if not body:
        return "is empty"
    return f"wrong content: {body[:60]!r}{'…' if len(body) > 60 else ''}"


def _probe_hint(exc: ProbeError, scheme: str) -> str:
    return {
        "dns": "the domain does not resolve: see the dns check",
        "refused": f"nothing listens on the {scheme} port: start nginx / open the firewall",
        "timeout": "no answer: a firewall or security group drops the traffic, or the server hangs",
        "tls": "fix the certificate first: see the tls check",
    }.get(exc.kind, "check that the server is up and reachable from here")


# --- (c) TLS certificate -----------------------------------------------------------------------


def check_tls(doctor: Doctor) -> CheckResult:
    name = "tls"
    target = _domain(doctor, name)
    if isinstance(target, CheckResult):
        return target
    host, port = target
    try:
        cert = doctor.prober.certificate(host, port)
    except ProbeError as exc:
        return failed(name, f"{host}:{port}: {exc}", _probe_hint(exc, "https"))
    days = cert.days_left()
    until = cert.not_after.strftime("%Y-%m-%d") if cert.not_after else "unknown"
    renew = (
        "renew the certificate: `certbot renew` (certbot.timer should do it) or install a new "
        "one (nginx_cert_mode provided), then reload nginx"
    )
    if not cert.verified:
        if days is not None and days < 0:
            return failed(name, f"expired {-days:.0f} days ago ({until})", renew)
        if "hostname" in cert.problem.lower():
            return failed(
                name,
                f"not valid for {host}: {cert.problem}",
                f"get a certificate whose names include {host} (ACME for this exact domain)",
            )
        return failed(
            name,
            f"does not verify: {cert.problem}",
            "serve the full chain (leaf + intermediates) from a public CA; a self-signed or "
            "private-CA certificate is refused by WeCom (--ca-file only for tests)",
        )
    if days is None:
        return failed(name, "certificate without an expiry date", renew)
    if days < doctor.options.cert_days:
        return failed(
            name,
            f"valid, but expires in {days:.1f} days ({until}), under --cert-days "
            f"{doctor.options.cert_days}",
            renew,
        )
    return passed(name, f"valid for {host}, {int(days)} days left (until {until})")


# --- (d) callback URL handshake ----------------------------------------------------------------


def _not_loaded(name: str, exc: ConfigError, hint: str) -> CheckResult:
    """A check the configuration does not allow: SKIP when a setting is missing, else FAIL."""
    if isinstance(exc, MissingSettingError):
        return skipped(name, f"{exc.variable} not set", hint)
    return failed(name, f"configuration: {exc}", "fix the value (`wecom-bridge check-config`)")


def _callback_app(doctor: Doctor, name: str) -> AppConfig | CheckResult:
    try:
        return doctor.app()
    except ConfigError as exc:
        return _not_loaded(
            name,
            exc,
            "export the app's values as entered in the console (接收消息 › 设置API接收: Token, "
            "EncodingAESKey; 我的企业 › 企业ID; the app's AgentId and Secret)",
        )


def _callback_crypto(app: AppConfig) -> WeComCrypto:
    """The handshake's keys: the self-built app's, or an AI bot's (whose ReceiveId is empty)."""
    if app.aibot is not None:
        return WeComCrypto(app.aibot.token, app.aibot.encoding_aes_key, "")
    return WeComCrypto(app.token, app.encoding_aes_key, app.corp_id)


def _handshake(
    doctor: Doctor, url: str, crypto: WeComCrypto, plaintext: str, *, garbled: bool = False
) -> Fetched:
    params = build_url_verification(crypto, plaintext)
    if garbled:
        # Correctly signed but not decryptable: a 400 then proves the Token was right.
        params["echostr"] = "A" * 44
        params["msg_signature"] = crypto.sign(params["timestamp"], params["nonce"], "A" * 44)
    return doctor.prober.get(url, params)


def check_callback(doctor: Doctor) -> CheckResult:
    name = "callback"
    if not (doctor.options.callback_url or doctor.options.domain):
        return skipped(name, "no --callback-url or --domain", "pass --domain or --callback-url")
    app = _callback_app(doctor, name)
    if isinstance(app, CheckResult):
        return app
    url = doctor.callback_url(app) or ""
    crypto = _callback_crypto(app)
    plaintext = str(10**18 + secrets.randbelow(9 * 10**18))
    try:
        got = _handshake(doctor, url, crypto, plaintext)
    except ProbeError as exc:
        return _callback_unreachable(name, url, exc)
    if got.status == 200:
        return _callback_answer(name, url, got, plaintext)
    if got.status == 403:
        return _callback_forbidden(doctor, name, url, crypto)
    if got.status == 404:
        return _callback_not_found(doctor, name, url, crypto, plaintext)
    if got.status == 400:
        return failed(
            name,
            f"{url}: 400 — the signature was accepted but echostr did not decrypt",
            "WECOM_ENCODING_AES_KEY differs between the console (this environment) and the "
            "bridge: set the same 43 characters in both and restart the bridge",
        )
    if 300 <= got.status < 400:
        return failed(
            name,
            f"{url}: redirect {got.status} to {got.headers.get('Location', '?')}",
            "WeCom does not follow redirects: enter the final https URL in the console",
        )
    if got.status >= 500:
        return failed(
            name,
            f"{url}: HTTP {got.status}",
            "the service behind the proxy is down or failing (502/504: the bridge is not running "
            "or not reachable from nginx); see the bridge-ready check and the bridge's logs",
        )
    return failed(name, f"{url}: unexpected HTTP {got.status}", "check the proxy's configuration")


def _callback_unreachable(name: str, url: str, exc: ProbeError) -> CheckResult:
    scheme = urlsplit(url).scheme
    hint = _probe_hint(exc, scheme)
    if exc.kind in ("refused", "timeout"):
        hint = f"service down or unreachable: {hint}"
    return failed(name, f"{url}: {exc}", hint)


def _callback_answer(name: str, url: str, got: Fetched, plaintext: str) -> CheckResult:
    problem = _content_problem(got.body, plaintext.encode())
    if problem:
        return failed(
            name,
            f"{url}: the answer {problem}",
            "answer the decrypted echostr alone: no quotes (JSON-encoding adds them), no BOM, "
            "no trailing newline, nothing else",
        )
    millis = got.elapsed * 1000
    if got.elapsed >= WECOM_DEADLINE:
        return failed(
            name,
            f"{url}: correct answer, but after {millis:.0f} ms (WeCom waits 1 s)",
            "make the handshake fast: the bridge answers it without I/O, so look at the proxy "
            "(upstream connect timeouts, DNS in proxy_pass) and the server's load",
        )
    return passed(name, f"{url} answered the signed handshake in {millis:.0f} ms")


def _callback_forbidden(doctor: Doctor, name: str, url: str, crypto: WeComCrypto) -> CheckResult:
    try:
        probe = _handshake(doctor, url, crypto, "0", garbled=True)
    except ProbeError:
        probe = None
    if probe is not None and probe.status == 400:
        return failed(
            name,
            f"{url}: 403 — the signature is right but the payload names another corp",
            "WECOM_CORP_ID differs between this environment and the bridge: both must be 企业ID "
            "from 我的企业",
        )
    return failed(
        name,
        f"{url}: 403 — the signature was refused",
        "WECOM_TOKEN differs between the console (this environment) and the bridge: set the "
        "Token from 接收消息 › 设置API接收 in both and restart the bridge",
    )


def _callback_not_found(
    doctor: Doctor, name: str, url: str, crypto: WeComCrypto, plaintext: str
) -> CheckResult:
    path = urlsplit(url).path or "/"
    if doctor.options.bridge_url:
        direct = doctor.options.bridge_url.rstrip("/") + path
        try:
            ok = _handshake(doctor, direct, crypto, plaintext).status == 200
        except ProbeError:
            ok = False
        if ok:
            return failed(
                name,
                f"{url}: 404, while the bridge itself answers {path}",
                f"the proxy does not pass {path} through unchanged: a `location` for {path} "
                "that proxies to the bridge without rewriting it (no trailing slash or URI "
                "after proxy_pass's address)",
            )
    return failed(
        name,
        f"{url}: 404 Not Found",
        f"wrong path, or a proxy rewrote it: the console URL's path ({path}) must equal the "
        "bridge's BRIDGE_CALLBACK_PATH and nginx_callback_path",
    )


# --- (e, f) WeCom API --------------------------------------------------------------------------


def check_gettoken(doctor: Doctor) -> CheckResult:
    name = "wecom-gettoken"
    try:
        doctor.app()
        base = doctor.api_base()
    except ConfigError as exc:
        return _not_loaded(name, exc, "export the app's corp id and Secret (and the rest of it)")
    try:
        doctor.wecom().access_token()
    except WeComConfigError as exc:
        return failed(name, f"gettoken: errcode {exc.errcode}", exc.hint)
    except WeComApiError as exc:
        return _wecom_failure(name, "gettoken", base, exc)
    return passed(name, f"gettoken at {base} issued an access token")


def check_trusted_ip(doctor: Doctor) -> CheckResult:
    name = "wecom-trusted-ip"
    token = doctor.results.get("wecom-gettoken")
    if token is None or token.status != Status.PASS:
        return skipped(name, "needs an access token", "fix the wecom-gettoken check first")
    base = doctor.api_base()
    try:
        doctor.wecom().call("GET", "/cgi-bin/getcallbackip")
    except WeComConfigError as exc:
        if exc.errcode == 60020:
            ip = exc.ip or "this server's egress IP"
            return failed(name, f"WeCom refuses API calls from {ip} (errcode 60020)", exc.hint)
        return failed(name, f"getcallbackip: errcode {exc.errcode}", exc.hint)
    except WeComApiError as exc:
        return _wecom_failure(name, "getcallbackip", base, exc)
    return passed(name, "API calls from this host are allowed (getcallbackip)")


def _wecom_failure(name: str, call: str, base: str, exc: WeComApiError) -> CheckResult:
    if exc.errcode is None:
        return failed(
            name,
            f"{call} at {base}: {exc.errmsg}",
            "outbound HTTPS to WeCom's API is blocked or WECOM_API_BASE is wrong "
            "(firewall, egress proxy)",
        )
    return failed(
        name,
        f"{call}: errcode {exc.errcode} {exc.errmsg[:80]}",
        hint_for(exc.errcode, exc.errmsg),
    )


# --- 微信客服 (kf) --------------------------------------------------------------------------------


def _kf(doctor: Doctor, name: str) -> KfConfig | CheckResult:
    try:
        kf = kf_from_env(doctor.options.env, (), require_dify=False)
    except ConfigError as exc:
        return _not_loaded(
            name,
            exc,
            "export the kf values: WECOM_KF_TOKEN and WECOM_KF_ENCODING_AES_KEY as set in the "
            "bound app's 接收消息 › 设置API接收, WECOM_KF_SECRET that app's Secret",
        )
    if kf is None:  # the checks run only when WECOM_KF_SECRET is set
        return skipped(name, "WECOM_KF_SECRET not set", "set it to check 微信客服")
    return kf


def check_kf_callback(doctor: Doctor) -> CheckResult:
    name = "kf-callback"
    if not (doctor.options.kf_callback_url or doctor.options.domain):
        return skipped(name, "no --kf-callback-url or --domain", "pass --domain")
    kf = _kf(doctor, name)
    if isinstance(kf, CheckResult):
        return kf
    url = doctor.options.kf_callback_url or f"https://{doctor.options.domain}{kf.callback_path}"
    crypto = WeComCrypto(kf.token, kf.encoding_aes_key, kf.corp_id)
    plaintext = str(10**18 + secrets.randbelow(9 * 10**18))
    try:
        got = _handshake(doctor, url, crypto, plaintext)
    except ProbeError as exc:
        return _callback_unreachable(name, url, exc)
    if got.status == 200:
        return _callback_answer(name, url, got, plaintext)
    hints = {
        403: "WECOM_KF_TOKEN (or WECOM_CORP_ID) differs between the bound app's 接收消息 settings "
        "and the bridge",
        400: "WECOM_KF_ENCODING_AES_KEY differs between the bound app's 接收消息 settings and the "
        "bridge",
        404: f"the path must be the bridge's WECOM_KF_CALLBACK_PATH ({kf.callback_path}) and the "
        "edge must route it (wecom_edge_kf_callback_path)",
    }
    hint = hints.get(got.status, "see the callback check's hints: the same proxy serves both")
    return failed(name, f"{url}: HTTP {got.status}", hint)


def check_kf_secret(doctor: Doctor) -> CheckResult:
    name = "kf-secret"
    kf = _kf(doctor, name)
    if isinstance(kf, CheckResult):
        return kf
    base = doctor.api_base()
    client = KfClient(
        WeComClient(
            api_base=base,
            corp_id=kf.corp_id,
            secret=kf.secret,
            token_cache=MemoryTokenCache(),
            max_attempts=1,
            timeout=(3.05, doctor.prober.timeout),
        )
    )
    try:
        accounts = client.accounts()
    except WeComConfigError as exc:
        hint = exc.hint
        if exc.errcode == 40001:
            hint = (
                "WECOM_KF_SECRET is wrong: the Secret of the self-built app chosen in 微信客服 › "
                "API › 可调用接口的应用 (应用管理 › that app › Secret)"
            )
        return failed(name, f"gettoken with WECOM_KF_SECRET: errcode {exc.errcode}", hint)
    except WeComApiError as exc:
        return _wecom_failure(name, "kf/account/list", base, exc)
    if not accounts:
        return failed(
            name,
            "the kf secret works but manages no 微信客服 account",
            "in 微信客服 › API choose the accounts this app manages (通过API管理微信客服账号)",
        )
    return passed(name, f"the kf secret manages {len(accounts)} account(s): {', '.join(accounts)}")


# --- (g) Dify ----------------------------------------------------------------------------------


def _quick_dify_settings(doctor: Doctor, name: str) -> DifySettings | CheckResult:
    """The app's Dify settings for one quick try (the doctor reports, the service retries), or
    the check's result when they cannot be loaded."""
    try:
        if doctor.kf_only():
            kf = kf_from_env(doctor.options.env, (), require_dify=True)
            configured = kf.dify if kf else None
        else:
            configured = doctor.app(with_dify=True).dify
    except ConfigError as exc:
        return _not_loaded(name, exc, "export DIFY_API_BASE (…/v1) and DIFY_API_KEY")
    if configured is None:  # pragma: no cover - with_dify=True always loads Dify's settings
        return skipped(name, "no Dify configured", "export DIFY_API_BASE (…/v1) and DIFY_API_KEY")
    return dataclasses.replace(
        configured, connect_timeout=3.0, read_timeout=doctor.prober.timeout, max_attempts=1
    )


def check_dify(doctor: Doctor) -> CheckResult:
    name = "dify"
    settings = _quick_dify_settings(doctor, name)
    if isinstance(settings, CheckResult):
        return settings
    configured, base = settings, settings.api_base
    try:
        info = DifyClient(settings).info()
    except DifyError as exc:
        return _dify_failure(name, base, exc)
    mode = str(info.get("mode", "?"))
    if configured.app_mode and configured.app_mode != mode:
        return failed(
            name,
            f"DIFY_APP_MODE={configured.app_mode} but the app is {mode}",
            f"set DIFY_APP_MODE={mode} or leave it empty (the bridge asks /v1/info)",
        )
    return passed(name, f"{base}: app {info.get('name', '?')!r}, mode {mode}")


def check_dify_inputs(doctor: Doctor) -> CheckResult:
    """The app's declared inputs (GET /v1/parameters) against DIFY_INPUTS / DIFY_QUERY_INPUT:
    a required input without a value would make Dify refuse every message."""
    name = "dify-inputs"
    settings = _quick_dify_settings(doctor, name)
    if isinstance(settings, CheckResult):
        return settings
    try:
        problems, warnings = DifyClient(settings).input_problems()
    except DifyError as exc:
        return skipped(name, f"cannot read the app's inputs ({exc.code})", "fix the dify check")
    if problems:
        return failed(
            name,
            "; ".join(problems),
            'set DIFY_INPUTS to a JSON object with a value for each, e.g. {"dept": "HR"} '
            "(the app's inputs: Dify › the app › 开始 node / 变量)",
        )
    detail = "every required input has a value"
    return passed(name, detail + (f" ({'; '.join(warnings)})" if warnings else ""))


def check_dify_media(
    doctor: Doctor, which: Callable[[str], str | None] = shutil.which
) -> CheckResult:
    """What members' media will meet: the app's file upload and speech to text (GET
    /v1/parameters), and SoX for voice notes (the self-built app's AMR)."""
    name = "dify-media"
    settings = _quick_dify_settings(doctor, name)
    if isinstance(settings, CheckResult):
        return settings
    try:
        features = DifyClient(settings).app_features()
    except DifyError as exc:
        return skipped(name, f"cannot read the app's features ({exc.code})", "fix the dify check")
    accepts = Acceptance.of(features)
    takes = sorted(accepts.types) if accepts.enabled else []
    speech = speech_to_text_on(features)
    detail = f"files: {', '.join(takes) or 'none'}; speech to text: {'on' if speech else 'off'}"
    if speech and which("sox") is None:
        return failed(
            name,
            detail + "; sox not found",
            "install SoX (Debian: apt-get install --no-install-recommends sox libsox-fmt-base "
            "libsox-fmt-mp3; the bridge image has it): voice notes are converted with it",
        )
    hint = (
        "" if takes else " (members' images and files get BRIDGE_MEDIA_TYPE_REPLY: 功能 › 文件上传)"
    )
    return passed(name, detail + hint)


def _dify_failure(name: str, base: str, exc: DifyError) -> CheckResult:
    if exc.status == 401:
        return failed(
            name,
            f"{base}/info: 401 — the API key was refused",
            "DIFY_API_KEY is wrong: copy the app's key (app › 访问 API › API 密钥, `app-…`)",
        )
    if exc.status == 404:
        return failed(
            name,
            f"{base}/info: 404",
            "DIFY_API_BASE must be the Service API base ending in /v1, e.g. http://127.0.0.1:8080/v1",
        )
    if exc.code in ("network", "timeout"):
        return failed(
            name,
            f"Dify unreachable at {base} ({exc.code})",
            "start Dify (`docker compose ps` in its folder) or fix DIFY_API_BASE; from a container "
            "127.0.0.1 is the container itself",
        )
    return failed(name, f"{base}/info: {exc}", "check Dify's api container logs")


# --- (h) bridge readiness ----------------------------------------------------------------------


def check_bridge_ready(doctor: Doctor) -> CheckResult:
    name = "bridge-ready"
    if not doctor.options.bridge_url:
        return skipped(
            name, "no --bridge-url given", "pass --bridge-url http://127.0.0.1:8400 (internal)"
        )
    url = doctor.options.bridge_url.rstrip("/") + "/readyz"
    try:
        got = doctor.prober.get(url)
    except ProbeError as exc:
        return failed(
            name, f"{url}: {exc}", "the bridge is not running: `docker ps`, the bridge's logs"
        )
    try:
        status = json.loads(got.body)
    except ValueError:
        status = {}
    if got.status == 200 and isinstance(status, dict) and status.get("ready"):
        return passed(name, f"{url}: ready, queue depth {status.get('queue_depth', '?')}")
    return failed(
        name,
        f"{url}: HTTP {got.status} {got.body[:120].decode('utf-8', 'replace')}",
        "db not writable: disk full or permissions of BRIDGE_DATA_DIR; workers false: the job "
        "process died (see the bridge's logs); a deep queue: Dify or WeCom too slow",
    )


def check_aibot_subscription(doctor: Doctor) -> CheckResult:
    """The AI bot's long connection: does WeCom accept the bot id and secret?"""
    name = "aibot-subscribe"
    try:
        app = doctor.app()
    except ConfigError as exc:
        return _not_loaded(name, exc, "set WECOM_AIBOT_BOT_ID and WECOM_AIBOT_SECRET")
    assert app.aibot is not None  # noqa: S101 - chosen for AI bots in ws mode
    if doctor.options.bridge_url:
        # Subscribing here would take the bot over from the running bridge.
        return skipped(
            name,
            "the running bridge holds the connection: bridge-ready shows its subscription",
            "run doctor without --bridge-url before the bridge starts to test the secret itself",
        )
    url = app.aibot.ws_url
    try:
        answer = probe_subscription(url, app.aibot.bot_id, app.aibot.secret, doctor.prober.timeout)
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI, AibotFrameError) as exc:
        return failed(
            name,
            f"{url}: {type(exc).__name__}: {exc}",
            "the server must reach it outbound on 443 (a proxy? a firewall?); "
            "WECOM_AIBOT_WS_URL names it",
        )
    if answer.errcode:
        return failed(
            name,
            f"{url}: WeCom refused the subscription: errcode {answer.errcode} {answer.errmsg}",
            "copy Bot ID and Secret again from the bot's API settings (API 模式: 长连接) into "
            "WECOM_AIBOT_BOT_ID / WECOM_AIBOT_SECRET",
        )
    return passed(name, f"{url}: subscribed as bot {app.aibot.bot_id}")


# --- output ------------------------------------------------------------------------------------


def display_width(text: str) -> int:
    """Terminal columns: CJK and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - display_width(text))


def render_table(results: Sequence[CheckResult]) -> str:
    width = max([display_width("CHECK"), *(display_width(r.name) for r in results)])
    lines = [f"{'STATUS':<6}  {_pad('CHECK', width)}  DETAIL"]
    for result in results:
        lines.append(f"{result.status!s:<6}  {_pad(result.name, width)}  {result.detail}")
        if result.hint and result.status != Status.PASS:
            lines.append(f"{'':<6}  {_pad('', width)}  ↳ {result.hint}")
    failures = sum(r.status == Status.FAIL for r in results)
    skips = sum(r.status == Status.SKIP for r in results)
    lines.append(f"\n{len(results) - failures - skips} passed, {failures} failed, {skips} skipped")
    return "\n".join(lines)


def render_json(results: Sequence[CheckResult]) -> str:
    return json.dumps([r.as_dict() for r in results], ensure_ascii=False, indent=2)


def run_doctor(options: DoctorOptions, prober: Prober) -> list[CheckResult]:
    return Doctor(options, prober).run()
