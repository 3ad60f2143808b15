"""End state after install -> upgrade -> refused downgrade -> restore: 1.17.0 from the backup."""

import json
import re
from pathlib import Path

import pytest
import yaml

SCENARIO_DIR = Path(__file__).resolve().parents[1]
TEST_VARS = yaml.safe_load((SCENARIO_DIR / "group_vars" / "all.yml").read_text())
BASE = "/opt/dify"
PROJECT = f"{BASE}/current/docker"
# Public defaults that ship in .env.example: none may survive in .env.
PUBLIC_DEFAULTS = [
    "sk-9f73s3ljTXVcMT3Blb3ljTqtsKiGHXVcMT3BlbkFJLK7U",
    "difyai123456",
    "WVF5YThaHlkYwhGUSmCRgsX3tD5ngdN8pkih",
    "dify-sandbox",
    "QaHbTe77CtuXmsfyhR7+vRjI/+XbV1AaFy691iy+kGDv2Jvy0/eAh8Y1",
    "lYkiYYT6owG+71oLerGzA7GXCgOT++6ovaezWAjpCjf+Sjc3ZtU+qUEi",
    "dify-agent-api-token",
    "dify-agent-local-sandbox-token",
]


def env(host):
    values = {}
    for line in host.file(f"{PROJECT}/.env").content_string.splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name] = value
    return values


def test_restored_version_recorded(host):
    assert host.file(f"{BASE}/VERSION").content_string.strip() == TEST_VARS["dify_test_version_a"]
    current = host.file(f"{BASE}/current")
    assert current.is_symlink
    assert current.linked_to == f"{BASE}/releases/{TEST_VARS['dify_test_version_a']}"
    # Both releases stay side by side; their volumes/ is the one persistent directory.
    for version in (TEST_VARS["dify_test_version_a"], TEST_VARS["dify_test_version_b"]):
        volumes = host.file(f"{BASE}/releases/{version}/docker/volumes")
        assert volumes.is_symlink and volumes.linked_to == f"{BASE}/volumes"
    assert host.file(f"{BASE}/volumes/sandbox/conf/config.yaml").is_file


@pytest.mark.parametrize("path", [f"{PROJECT}/.env", f"{BASE}/secrets.yml"])
def test_secret_files_root_only(host, path):
    f = host.file(path)
    assert f.user == "root"
    assert f.mode == 0o600


def test_env_has_production_values(host):
    values = env(host)
    url = f"https://{TEST_VARS['wecom_dify_domain']}"
    for name in (
        "CONSOLE_API_URL",
        "CONSOLE_WEB_URL",
        "SERVICE_API_URL",
        "APP_API_URL",
        "APP_WEB_URL",
        "FILES_URL",
    ):
        assert values[name] == url, name
    assert values["EXPOSE_NGINX_PORT"] == "127.0.0.1:8080"
    assert values["EXPOSE_NGINX_SSL_PORT"] == "127.0.0.1:8443"
    assert values["EXPOSE_PLUGIN_DEBUGGING_PORT"] == "127.0.0.1:5003"
    assert values["CHECK_UPDATE_URL"] == ""
    assert values["MARKETPLACE_ENABLED"] == "false"
    assert values["PIP_MIRROR_URL"] == TEST_VARS["wecom_dify_pip_mirror_url"]
    assert values["FIXTURE_APP_API_KEY"] == TEST_VARS["dify_test_app_api_key"]


def test_secrets_generated_paired_and_kept(host):
    values = env(host)
    kept = yaml.safe_load(host.file(f"{BASE}/secrets.yml").content_string)
    text = host.file(f"{PROJECT}/.env").content_string
    for default in PUBLIC_DEFAULTS:
        assert default not in text
    for name, value in kept.items():
        assert values[name] == value, name
    assert values["PLUGIN_DAEMON_KEY"] == TEST_VARS["wecom_dify_secrets"]["PLUGIN_DAEMON_KEY"]
    assert len(values["SECRET_KEY"]) >= 42
    assert values["CODE_EXECUTION_API_KEY"] == values["SANDBOX_API_KEY"]
    assert values["WEAVIATE_AUTHENTICATION_APIKEY_ALLOWED_KEYS"] == values["WEAVIATE_API_KEY"]
    assert values["CELERY_BROKER_URL"] == f"redis://:{values['REDIS_PASSWORD']}@redis:6379/1"
    assert len(values["DIFY_AGENT_SERVER_SECRET_KEY"]) == 44


def test_database_uses_generated_password(host):
    password = env(host)["DB_PASSWORD"]
    res = host.run(
        "cd %s && docker compose -p dify exec -T -e PGPASSWORD=%s api "
        "psql -h db_postgres -U postgres -d dify -tAc 'SELECT 1'",
        PROJECT,
        password,
    )
    assert res.rc == 0, res.stderr
    assert res.stdout.strip() == "1"


def test_services_healthy(host):
    out = host.check_output("cd %s && docker compose -p dify ps --format json", PROJECT)
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    services = {row["Service"]: row for row in rows}
    assert {"api", "db_postgres", "redis", "nginx"} <= services.keys()
    for name in ("api", "db_postgres", "redis"):
        assert services[name]["Health"] == "healthy", services[name]


def test_nginx_on_loopback_only(host):
    listeners = host.check_output("ss -Hltn sport = :8080").splitlines()
    assert {line.split()[3] for line in listeners} == {"127.0.0.1:8080"}
    res = host.run("curl -sS --fail http://127.0.0.1:8080/console/api/setup")
    assert res.rc == 0, res.stderr
    address = host.interface("eth0").addresses[0]
    assert host.run("curl -sS --max-time 3 http://%s:8080/", address).rc != 0


def test_setup_finished_by_role(host):
    res = json.loads(host.check_output("curl -sS http://127.0.0.1:8080/console/api/setup"))
    assert res["step"] == "finished"


def test_service_api_on_compose_network(host):
    """How the bridge reaches Dify: a container on dify_default asks http://nginx/v1 by name."""
    res = host.run(
        "docker run --rm --network dify_default --entrypoint curl wecom-test/dify-stand-in:%s "
        "-sS --fail -H 'Authorization: Bearer %s' http://nginx/v1/info",
        TEST_VARS["dify_test_version_a"],
        TEST_VARS["dify_test_app_api_key"],
    )
    assert res.rc == 0, res.stderr
    assert json.loads(res.stdout)["mode"] == "chat"


def test_backups_root_only(host):
    backups = host.file("/var/backups/dify")
    assert backups.mode == 0o700
    [backup] = backups.listdir()
    for name in host.file(f"{backups.path}/{backup}").listdir():
        assert host.file(f"{backups.path}/{backup}/{name}").mode == 0o600, name
    assert any(name.startswith("volumes.pre-restore-") for name in host.file(BASE).listdir())


def test_images_were_pulled_through_the_registry_mirror(host):
    """Pulled, not loaded (a loaded image has no repo digest), and from the mirror's registry."""
    image = TEST_VARS["dify_test_image"]
    registry_log = host.check_output("journalctl -u docker-registry --no-pager -o cat")
    for version in (TEST_VARS["dify_test_version_a"], TEST_VARS["dify_test_version_b"]):
        inspect = "docker image inspect -f '{{json .RepoDigests}}' %s:%s"
        digests = json.loads(host.check_output(inspect, image, version))
        assert digests and all(d.startswith(f"{image}@sha256:") for d in digests), digests
        # The registry's access log: a pull looks the tag up with HEAD (or GET).
        manifest = re.escape(f"/v2/{image}/manifests/{version}")
        assert re.search(rf'"(HEAD|GET) {manifest} HTTP/1\.1" 200', registry_log), version


def test_releases_were_downloaded_from_the_tag_archive_mirror(host):
    mirror_log = host.check_output("journalctl -u dify-release-mirror --no-pager -o cat")
    for version in (TEST_VARS["dify_test_version_a"], TEST_VARS["dify_test_version_b"]):
        path = f"/langgenius/dify/archive/refs/tags/{version}.tar.gz"
        assert f'"GET {path} HTTP/1.1" 200' in mirror_log, version
        assert host.file(f"{BASE}/archives/dify-{version}.tar.gz").mode == 0o600
