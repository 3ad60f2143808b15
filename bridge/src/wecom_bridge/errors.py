"""Error types of the bridge. Callers branch on the type, never on message strings."""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """A configuration value is missing or invalid; names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class MissingSettingError(ConfigError):
    """A required setting is not set at all (tools report the check as skipped, not failed)."""


# --- callback protocol -----------------------------------------------------------------------


class CallbackError(BridgeError):
    """A callback could not be accepted. `http_status` is what WeCom gets back."""

    http_status = 400
    # Tencent's reference library codes, used as categories in logs and metrics.
    wecom_code = -40002


class SignatureError(CallbackError):
    http_status = 403
    wecom_code = -40001


class ReceiveIdError(CallbackError):
    """The decrypted payload names another corp: a message for someone else."""

    http_status = 403
    wecom_code = -40005


class DecryptError(CallbackError):
    wecom_code = -40007


class Base64Error(CallbackError):
    wecom_code = -40010


class MalformedXmlError(CallbackError):
    wecom_code = -40002


class MalformedJsonError(CallbackError):
    """An AI-bot webhook body that is not the JSON {"encrypt": …} WeCom sends."""

    wecom_code = -40002


class MissingParameterError(CallbackError):
    """A signed query parameter (msg_signature, timestamp, nonce, echostr) is missing."""

    http_status = 400


class BodyTooLargeError(CallbackError):
    http_status = 413
    wecom_code = -40008


class SendRequestError(BridgeError):
    """A proactive send request (API body or CLI arguments) is invalid; names the field."""

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class IdempotencyConflictError(BridgeError):
    """An Idempotency-Key came back with a different request than the one it first queued."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"the key was used for another request (message {job_id})")
        self.job_id = job_id


class JobPayloadError(BridgeError):
    """A stored job's payload cannot be read as its kind (never retried: it would fail again)."""


class StoreUnavailableError(BridgeError):
    """The durable store could not take the write (disk full, locked too long)."""


# --- Dify ------------------------------------------------------------------------------------


class DifyError(BridgeError):
    """Dify answered with an error or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retryable = retryable


class ConversationNotFoundError(DifyError):
    """Dify forgot the conversation id we stored (404 "Conversation Not Exists.") or refuses it
    (400 invalid_param on conversation_id, e.g. not a UUID): either way a new one is started."""


class DifyPausedError(DifyError):
    """A workflow run paused for human input (status `paused`): there is no answer to send now."""

    def __init__(self, run_id: str, reasons: object = None) -> None:
        super().__init__(f"workflow run {run_id} paused for human input", code="workflow_paused")
        self.run_id = run_id
        self.reasons = reasons


# --- WeCom API -------------------------------------------------------------------------------


class WeComApiError(BridgeError):
    """WeCom's API answered with a non-zero errcode (or could not be reached: errcode None)."""

    def __init__(
        self,
        errcode: int | None,
        errmsg: str,
        *,
        retryable: bool = False,
        retry_after: float = 0.0,
    ) -> None:
        super().__init__(f"errcode={errcode} {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg
        self.retryable = retryable
        self.retry_after = retry_after  # seconds WeCom blocks further calls (frequency limits)


class WeComConfigError(WeComApiError):
    """An error only the admin can fix (40001 wrong secret, 60020 IP not trusted).

    Retrying is pointless and hammering gettoken gets the caller blocked.
    """

    def __init__(self, errcode: int, errmsg: str, *, hint: str, ip: str | None = None) -> None:
        super().__init__(errcode, errmsg, retryable=False)
        self.hint = hint
        self.ip = ip  # 60020: the egress IP to add to 企业可信IP, when WeCom named it


# --- media a member sent ---------------------------------------------------------------------


class MediaRefusedError(BridgeError):
    """Media the bridge will not hand to Dify: the member hears why (`reason` picks the text:
    type, too_large, corrupt, expired, failed, voice_off, no_speech). Never retried."""

    def __init__(self, reason: str, detail: str, **values: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.values = values  # for the member's text, e.g. {"limit": "10 MB"}


class MediaTransientError(BridgeError):
    """A download or upload that may work later (network, 5xx, WeCom busy)."""


class JobDeferredError(BridgeError):
    """The job cannot go on yet (a caption may still come; a transient media failure): it is
    queued again for `delay` seconds, keeping its place in the member's line."""

    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason
