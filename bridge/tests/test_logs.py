"""Log lines: JSON or text with the context fields, written by a background thread when asked."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from conftest import wait_for

from wecom_bridge.logs import setup_logging
from wecom_bridge.testing.callbacks import CallbackClient


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    setup_logging()  # stops a background writer
    root.handlers[:], root.level = handlers, level


def test_background_writer_keeps_every_line_and_its_context(capsys) -> None:
    setup_logging("json", "INFO", background=True)
    log = logging.getLogger("wecom_bridge.test")

    def burst(n: int) -> None:
        for i in range(200):
            log.info("callback stored", extra={"job_id": n * 1000 + i, "user": f"u{n}"})

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("job failed", extra={"job_id": 7})
    setup_logging("json", "INFO")  # stops the writer after it has written everything queued

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    stored = [line for line in lines if line["msg"] == "callback stored"]
    assert sorted(line["job_id"] for line in stored) == sorted(
        n * 1000 + i for n in range(4) for i in range(200)
    )
    assert {line["user"] for line in stored} == {"u0", "u1", "u2", "u3"}
    failed = next(line for line in lines if line["msg"] == "job failed")
    assert failed["job_id"] == 7 and failed["level"] == "ERROR"
    assert "ValueError: boom" in failed["exc"]


def test_text_format_carries_the_context(capsys) -> None:
    setup_logging("text", "WARNING")
    logging.getLogger("wecom_bridge.test").warning("refused", extra={"reason": "SignatureError"})
    logging.getLogger("wecom_bridge.test").info("not shown")
    err = capsys.readouterr().err
    assert "WARNING wecom_bridge.test: refused reason=SignatureError" in err
    assert "not shown" not in err


def test_callbacks_are_summed_up_at_info_and_refusals_logged_one_by_one(
    caplog: pytest.LogCaptureFixture, callbacks: CallbackClient
) -> None:
    caplog.set_level(logging.INFO, logger="wecom_bridge")
    time.sleep(1.2)  # bridges of earlier tests flush what they counted within a second
    caplog.clear()
    for n in range(3):
        assert callbacks.send_text(f"sum{n}", "hi", msg_id=f"880{n}").status_code == 200
    assert callbacks.send_text("sum0", "hi", msg_id="8800").status_code == 200  # redelivery
    forged = callbacks.post({"msg_signature": "0" * 40, "timestamp": "1", "nonce": "2"}, b"<xml/>")
    assert forged.status_code == 400

    def summary() -> logging.LogRecord | None:
        return next((r for r in caplog.records if r.getMessage() == "callbacks stored"), None)

    record = wait_for(summary, timeout=5)
    assert (record.accepted, record.duplicate) == (3, 1)  # type: ignore[union-attr]
    assert not [r for r in caplog.records if r.getMessage() == "callback stored"]  # DEBUG only
    refused = [r for r in caplog.records if r.getMessage() == "callback refused"]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING
