"""nginx at the edge: WeCom's domain verification file, TLS and the ACME certificate."""

import shlex

import pytest
from conftest import DOMAIN, PEBBLE_ROOT, TEST_VARS

CODE = TEST_VARS["wecom_test_verify_code"]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_verify_file_byte_exact(edge, scheme):
    res = getattr(edge, scheme)(f"/WW_verify_{CODE}.txt")
    assert res.status == 200
    assert res.content_type.startswith("text/plain")
    assert res.body == CODE


UNKNOWN_CODES = ["/WW_verify_0000000000000000.txt", "/WW_verify_.txt", "/WW_verify_x"]


@pytest.mark.parametrize("path", UNKNOWN_CODES)
def test_unknown_verify_paths_not_served(edge, path):
    # The edge owns the whole /WW_verify_ namespace on both ports: unknown names are its 404,
    # never passed on to Dify (whose web app may answer 200) nor redirected.
    for res in (edge.https(path), edge.http(path)):
        assert res.status == 404, res
        assert "Dify" not in res.body


@pytest.mark.parametrize(
    "path", ["/.well-known/acme-challenge/", "/.well-known/acme-challenge/missing"]
)
def test_acme_webroot_not_listed(edge, path):
    assert edge.http(path).status in (403, 404)


def s_client(host, *args):
    cmd = [
        "openssl",
        "s_client",
        "-connect",
        "127.0.0.1:443",
        "-servername",
        DOMAIN,
        *args,
    ]
    return host.run(shlex.join(cmd) + " </dev/null")


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_old_tls_refused(host, version):
    # SECLEVEL=0 lets the client offer the old protocol, so a failure is the server's refusal.
    res = s_client(host, version, "-cipher", "DEFAULT:@SECLEVEL=0")
    assert res.rc != 0
    assert "no protocols available" not in res.stdout + res.stderr


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_modern_tls_accepted(host, edge, version):
    res = host.run(
        "curl -sS -o /dev/null --cacert %s --tlsv%s --tls-max %s https://%s/WW_verify_%s.txt",
        PEBBLE_ROOT,
        version,
        version,
        DOMAIN,
        CODE,
    )
    assert res.rc == 0, res.stderr


def test_post_quantum_group_negotiated(host, edge):
    """X25519MLKEM768 comes first where OpenSSL has it (Debian 13's 3.5). sslyze (test_tls_profile)
    cannot offer it, so the server's openssl offers only that group and must get a handshake."""
    res = s_client(
        host, "-tls1_3", "-groups", "X25519MLKEM768", "-CAfile", PEBBLE_ROOT, "-verify_return_error"
    )
    assert res.rc == 0, res.stdout + res.stderr
    assert "X25519MLKEM768" in res.stdout + res.stderr, res.stdout


def test_certificate_issued_by_pebble(host, edge):
    res = s_client(host, "-verify_return_error", "-CAfile", PEBBLE_ROOT)
    assert res.rc == 0, res.stderr
    issuer = host.check_output(
        "openssl s_client -connect 127.0.0.1:443 -servername %s </dev/null 2>/dev/null"
        " | openssl x509 -noout -issuer",
        DOMAIN,
    )
    assert "Pebble Intermediate CA" in issuer


def test_renewal_configured(host):
    assert host.service("certbot.timer").is_enabled
    hooks = host.file("/etc/letsencrypt/renewal-hooks/deploy")
    assert any(host.file(f"{hooks.path}/{name}").mode & 0o100 for name in hooks.listdir())
    renewal = host.file(f"/etc/letsencrypt/renewal/{DOMAIN}.conf")
    assert renewal.contains("https://127.0.0.1:14000/dir")


def test_renewal_dry_run_against_pebble(host):
    """What certbot.timer will run, end to end against the ACME server (no deploy hook)."""
    bundle = f"{TEST_VARS['wecom_test_pebble_dir']}/cert.pem"
    # --server: a dry run otherwise swaps in Let's Encrypt's staging directory.
    res = host.run(
        "REQUESTS_CA_BUNDLE=%s certbot renew --dry-run --no-random-sleep-on-renew --server %s",
        bundle,
        TEST_VARS["wecom_edge_acme_directory_url"],
    )
    assert res.rc == 0, res.stdout + res.stderr
