"""WeCom's limits for media the bridge uploads, and what an upload gives back.

From WeCom's 上传临时素材 (media/upload, doc 90389 — the AI bot's upload frames take the same
types and limits): an image is JPG or PNG of at most 10 MB, a voice an AMR of at most 2 MB and
60 s, a video an MP4 of at most 10 MB, any file at most 20 MB; every file more than 5 bytes.
A media_id is valid for 3 days after it was created.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 1024 * 1024
IMAGE_LIMIT = 10 * MB
VOICE_LIMIT = 2 * MB
VIDEO_LIMIT = 10 * MB
FILE_LIMIT = 20 * MB
MIN_BYTES = 6  # "all files must be larger than 5 bytes"
LIMITS = {"image": IMAGE_LIMIT, "voice": VOICE_LIMIT, "video": VIDEO_LIMIT, "file": FILE_LIMIT}
MEDIA_ID_LIFETIME = 3 * 24 * 3600.0
# Errcodes of media/upload and of sending a media_id (WeCom's global errcode list, doc 90313).
ERR_MEDIA_TYPE = 40004  # 不合法的媒体文件类型
ERR_TYPE_PARAM = 40005  # 不合法的type参数
ERR_FILE_SIZE = 40006  # 不合法的文件大小
ERR_MEDIA_ID = 40007  # 不合法的media_id参数 (unknown or expired)
ERR_IMAGE_SIZE = 40009  # 上传图片大小不是有效值
ERR_EMPTY_MEDIA = 44001  # 多媒体文件为空


@dataclass(frozen=True)
class UploadedMedia:
    """A media_id and when WeCom created it (epoch seconds): it expires 3 days later."""

    media_id: str
    created_at: float
    type: str

    def expired(self, now: float, margin: float = 3600.0) -> bool:
        return now >= self.created_at + MEDIA_ID_LIFETIME - margin
