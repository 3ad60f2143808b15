"""Wrong variables stop wecom.dify.site before they change what runs.

Each case runs the installed collection's site playbook against the converged server with one
variable added (extra vars). An old name of before 1.0 must stop the run in the pre-flight, naming
the new variable, with no change at all. A value the bridge rejects must stop the run at the
bridge's own check-config with the bridge's message, before the running container is replaced.
Neither may print a secret's value.
"""

import json
import os
import subprocess

import pytest

SECRET = "old-secret-value-must-not-show"
# old name -> (a value, the new name). nginx_domain: a required variable under its old name is
# reported as renamed, not as wecom_edge_domain missing.
CASES = {
    "nginx_domain": ("wecom-bot.test", "wecom_edge_domain"),
    "nginx_wecom_verify_codes": (["Xk2mP9qLw7Rt3sVb"], "wecom_edge_verify_codes"),
    "docker_daemon_options": ({}, "wecom_docker_daemon_options"),
    "dify_version": ("1.17.1", "wecom_dify_version"),
    "bridge_wecom_secret": (SECRET, "wecom_bridge_wecom_secret"),
}


def site(extra_vars, *args):
    run = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            "wecom.dify.site",
            "-e",
            json.dumps(extra_vars),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return run, run.stdout + run.stderr


@pytest.mark.parametrize("name", CASES)
def test_old_variable_name_stops_the_preflight(name):
    value, new_name = CASES[name]
    run, out = site({name: value})
    assert run.returncode != 0, out[-3000:]
    assert f"{name} is now {new_name}." in out, out[-3000:]
    assert "Pre-flight" in out, out[-3000:]
    assert "PLAY [Docker]" not in out, out[-3000:]
    assert "changed=0" in out.split("PLAY RECAP")[-1], out[-1000:]
    assert SECRET not in out


def test_bridge_check_config_stops_before_the_container_is_replaced(host):
    container = "docker inspect -f '{{.Id}}' wecom-bridge"
    before = host.check_output(container)
    # 43 characters, so the pre-flight has nothing to say, but not base64: only the bridge knows.
    bad_key = "!" * 43
    run, out = site({"wecom_bridge_wecom_encoding_aes_key": bad_key}, "--tags", "bridge")
    try:
        assert run.returncode != 0, out[-3000:]
        assert "configuration error: WECOM_ENCODING_AES_KEY" in out, out[-3000:]
        assert bad_key not in out
        assert host.check_output(container) == before
    finally:
        # The env file now holds the bad key: write the right one back (the container is unchanged).
        again, again_out = site({}, "--tags", "bridge")
        assert again.returncode == 0, again_out[-3000:]
    assert host.check_output(container) == before


def test_kf_secret_without_the_kf_callback_settings_stops_the_preflight():
    run, out = site({"wecom_bridge_kf_secret": SECRET, "wecom_bridge_kf_token": ""})
    assert run.returncode != 0, out[-3000:]
    assert "wecom_bridge_kf_token and wecom_bridge_kf_encoding_aes_key" in out, out[-3000:]
    assert "PLAY [Docker]" not in out, out[-3000:]
    assert SECRET not in out
