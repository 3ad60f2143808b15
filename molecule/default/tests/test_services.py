"""The host side: services, the bridge's secrets and its exposure."""

import json

import pytest

BRIDGE_PORT = "8400"


@pytest.mark.parametrize("name", ["docker", "nginx"])
def test_service_running_and_enabled(host, name):
    service = host.service(name)
    assert service.is_running
    assert service.is_enabled


def test_env_file_readable_by_root_only(host):
    env_file = host.file("/etc/wecom-bridge/bridge.env")
    assert env_file.is_file
    assert env_file.user == "root"
    assert env_file.mode == 0o600
    assert host.file("/etc/wecom-bridge").mode == 0o700


def test_bridge_container_read_only_non_root(host):
    inspect = json.loads(host.check_output("docker inspect wecom-bridge"))[0]
    assert inspect["State"]["Running"]
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    assert inspect["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    # The image's HEALTHCHECK (first probe 30 s after start).
    assert inspect["State"]["Health"]["Status"] in ("starting", "healthy")
    assert host.check_output("docker exec wecom-bridge id -u") == "10001"
    write = host.run("docker exec wecom-bridge touch /opt/wecom-bridge/probe")
    assert write.rc != 0
    assert "Read-only file system" in write.stderr


def test_bridge_port_on_loopback_only(host):
    listeners = host.check_output("ss -Hltn sport = :%s", BRIDGE_PORT).splitlines()
    local = {line.split()[3] for line in listeners}
    assert local == {f"127.0.0.1:{BRIDGE_PORT}"}
    assert host.run("curl -sS --fail http://127.0.0.1:%s/healthz", BRIDGE_PORT).rc == 0
    address = host.interface("eth0").addresses[0]
    outside = host.run("curl -sS --max-time 3 http://%s:%s/healthz", address, BRIDGE_PORT)
    assert outside.rc != 0


def test_dify_env_root_only_and_healthy(host):
    env_file = host.file("/opt/dify/current/docker/.env")
    assert env_file.user == "root"
    assert env_file.mode == 0o600
    assert host.file("/opt/dify/secrets.yml").mode == 0o600
    assert host.file("/opt/dify/VERSION").content_string.strip() == "1.17.1"
    out = host.check_output(
        "cd /opt/dify/current/docker && docker compose -p dify ps --format json"
    )
    health = {
        row["Service"]: row["Health"] for row in map(json.loads, filter(None, out.splitlines()))
    }
    assert health["api"] == "healthy"
    assert health["db_postgres"] == "healthy"


def test_dify_setup_finished_through_edge(host):
    """The role created the first admin through https://<domain>/console/api/setup."""
    host.check_output(
        "curl -sS --fail --cacert /etc/pebble/cert.pem -o /tmp/pebble-root.pem "
        "https://127.0.0.1:15000/roots/0"
    )
    res = host.check_output(
        "curl -sS --fail --cacert /tmp/pebble-root.pem https://wecom-bot.test/console/api/setup"
    )
    assert json.loads(res)["step"] == "finished"
