"""The pre-flight of wecom.dify.site refuses the variable names of before 1.0, before any change.

Each case runs the installed collection's site playbook against the converged server with one old
name added (extra vars): the run must stop in the pre-flight, name the new variable, change nothing
and never print a secret's value.
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


@pytest.mark.parametrize("name", CASES)
def test_old_variable_name_stops_the_preflight(name):
    value, new_name = CASES[name]
    run = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            "wecom.dify.site",
            "-e",
            json.dumps({name: value}),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-3000:]
    assert f"{name} is now {new_name}." in out, out[-3000:]
    assert "Pre-flight" in out, out[-3000:]
    assert "PLAY [Docker]" not in out, out[-3000:]
    assert "changed=0" in out.split("PLAY RECAP")[-1], out[-1000:]
    assert SECRET not in out
