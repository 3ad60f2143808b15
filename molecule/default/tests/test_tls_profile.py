"""The edge's TLS checked by a standard tool: sslyze against Mozilla's intermediate profile.

sslyze runs here on the controller against the server's address (SNI: the test domain) and gets the
current pebble root as the only extra trust anchor, so the certificate passes path validation for
the right reason: it chains to the ACME CA that issued it, not because the scanner looks away.
"""

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from conftest import DOMAIN

# Let's Encrypt's certificate lifetime, which prepare.yml gives pebble (certificateValidityPeriod).
LETS_ENCRYPT_DAYS = 90
# sslyze's name for the trust store given with --certinfo_ca_file.
SUPPLIED_CA = "Supplied CA file"


@pytest.fixture(scope="module")
def sslyze_scan(server_address, pebble_root_file, tmp_path_factory):
    report = tmp_path_factory.mktemp("sslyze") / "scan.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sslyze",
            "--mozilla_config",
            "intermediate",
            "--certinfo_ca_file",
            str(pebble_root_file),
            f"--json_out={report}",
            f"{DOMAIN}:443{{{server_address}}}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    # Kept with the other reports (CI keeps .cache/reports): the scan and its verdict, readable.
    reports = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"], ".cache", "reports")
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "sslyze-edge.txt").write_text(run.stdout + run.stderr)
    return run, json.loads(report.read_text())


def test_compliant_with_mozilla_intermediate(sslyze_scan):
    run, _ = sslyze_scan
    # sslyze exits 1 on any deviation from the profile and lists each one.
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "OK - Compliant." in run.stdout


def leaf_deployment(scan):
    (server,) = scan["server_scan_results"]
    assert server["scan_status"] == "COMPLETED", server
    certinfo = server["scan_result"]["certificate_info"]
    assert certinfo["status"] == "COMPLETED", certinfo
    return certinfo["result"]["certificate_deployments"][0]


def test_certificate_trusted_through_the_test_ca_only(sslyze_scan):
    deployment = leaf_deployment(sslyze_scan[1])
    verdicts = {
        result["trust_store"]["name"]: result["was_validation_successful"]
        for result in deployment["path_validation_results"]
    }
    # --certinfo_ca_file (the pebble root) validates it; no public store may trust a test cert.
    assert verdicts.pop(SUPPLIED_CA) is True, verdicts
    assert verdicts and not any(verdicts.values()), verdicts
    # Path validation includes the name: the certificate is for the name sslyze sent as SNI.
    certinfo = sslyze_scan[1]["server_scan_results"][0]["scan_result"]["certificate_info"]
    assert certinfo["result"]["hostname_used_for_server_name_indication"] == DOMAIN


def test_certificate_has_lets_encrypt_lifetime(sslyze_scan):
    leaf = leaf_deployment(sslyze_scan[1])["received_certificate_chain"][0]
    days = (
        datetime.fromisoformat(leaf["not_valid_after"])
        - datetime.fromisoformat(leaf["not_valid_before"])
    ).days
    assert days <= LETS_ENCRYPT_DAYS, leaf["not_valid_before"] + " .. " + leaf["not_valid_after"]
