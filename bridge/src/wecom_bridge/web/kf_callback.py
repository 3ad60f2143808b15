"""The 微信客服 (kf) callback: verified and acknowledged at once; the messages are pulled later.

The callback is only a signal for one kf account: the endpoint stores a pull job in that
account's pull line (deduplicated by the callback's one-time Token, so WeCom's redelivery adds
nothing) and answers 200 after the commit, like every callback. The job side pulls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from wecom_bridge.channels.kf import KfInbound, signal_message
from wecom_bridge.jobs.kinds import KfPullJob, new_job
from wecom_bridge.web.callbacks import CallbackEndpoint, HttpAnswer


@dataclass(frozen=True)
class KfCallbackEndpoint(CallbackEndpoint):
    kf: KfInbound

    def receive(self, args: Mapping[str, str], body: bytes) -> HttpAnswer:
        signal = self.kf.signal(args, body)
        message = signal_message(self.app, signal)
        if signal is None:  # the bound app's own events: acknowledged, nothing to pull
            self._record(message, 0)
            return HttpAnswer(200)
        spec = KfPullJob(open_kfid=signal.open_kfid, token=signal.token)
        job_id = self.acceptor.accept(self.app, message.dedupe_key, new_job(message.sender, spec))
        self._record(message, job_id)
        return HttpAnswer(200)
