"""Cross-process wake-up: the web processes poke the job process after storing a job.

A Unix datagram socket in the data directory. Best effort by design: a lost poke only delays
the job until the workers' next poll (1 s), it never loses it — the job is in the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("wecom_bridge.service.wakeup")

SOCKET_NAME = "wake.sock"


class WakeupSender:
    def __init__(self, data_dir: Path) -> None:
        self._path = str(data_dir / SOCKET_NAME)
        self._local = threading.local()

    def send(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._local.sock = sock
        with contextlib.suppress(OSError):  # job process not up, or its buffer full: it polls
            sock.sendto(b"!", self._path)


class WakeupListener:
    """Calls `on_wake` for every poke; runs in a daemon thread of the job process."""

    def __init__(self, data_dir: Path, on_wake: Callable[[], None]) -> None:
        self._path = data_dir / SOCKET_NAME
        self._on_wake = on_wake
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()  # left by a process that was killed
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self._path))
        os.chmod(self._path, 0o600)
        self._thread = threading.Thread(target=self._run, name="bridge-wakeup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self._sock.recv(64)
            except OSError:
                return
            self._on_wake()

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
