"""Split long answers into parts that fit WeCom's 2048-byte text limit.

WeCom truncates longer `text.content` silently, so an answer is cut before sending. Cuts fall on the
most natural boundary in the second half of each part (paragraph, line, sentence, then word or
comma) and never inside a character or, when avoidable, inside a user-perceived character (emoji
ZWJ sequences, flags, combining marks, variation selectors). Separators stay at the end of the
earlier part, so ''.join(parts) == text.
"""

from __future__ import annotations

import re
import unicodedata

from wecom_bridge.wecom.messages import WECOM_TEXT_LIMIT

__all__ = ["WECOM_TEXT_LIMIT", "cap_parts", "is_cluster_boundary", "split_message"]

# Boundaries, best first. Each match ends where a part may end.
_TIERS = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraph end
    re.compile(r"\n\s*"),  # line end
    # CJK sentence marks end a sentence anywhere; ASCII ones only before whitespace ("3.14").
    re.compile(r"(?:[。！？；…]+|[.!?;]+(?=\s))[\"'”’」』）)\]】]*\s*"),
    re.compile(r"[，、,：:]\s*|\s+"),
)
# A natural boundary is only worth taking if the part keeps at least this share of the limit.
_MIN_FILL = 0.5
# How far back (in code points) to look for a grapheme boundary before cutting anyway.
_CLUSTER_LOOKBACK = 32

_ZWJ = "\u200d"


def _is_regional_indicator(ch: str) -> bool:
    return "\U0001f1e6" <= ch <= "\U0001f1ff"


def _extends_previous(ch: str) -> bool:
    """Characters that belong to the preceding one: marks, ZWJ, selectors, skin tones, tags."""
    return (
        ch == _ZWJ
        or unicodedata.category(ch) in ("Mn", "Me", "Mc")
        or "\ufe00" <= ch <= "\ufe0f"
        or "\U000e0100" <= ch <= "\U000e01ef"
        or "\U0001f3fb" <= ch <= "\U0001f3ff"
        or "\U000e0020" <= ch <= "\U000e007f"
    )


def is_cluster_boundary(text: str, index: int) -> bool:
    """Whether cutting before text[index] keeps user-perceived characters whole (approximation
    of UAX #29 good enough for chat text)."""
    if index <= 0 or index >= len(text):
        return True
    prev, cur = text[index - 1], text[index]
    if prev == "\r" and cur == "\n":
        return False
    if prev == _ZWJ or _extends_previous(cur):
        return False
    if _is_regional_indicator(cur):
        run = 0
        while index - run - 1 >= 0 and _is_regional_indicator(text[index - run - 1]):
            run += 1
        return run % 2 == 0  # inside a flag when an odd number of indicators precede
    return True


def _max_end(text: str, start: int, limit: int) -> tuple[int, list[int]]:
    """Largest end index with text[start:end] <= limit bytes, and cumulative byte counts."""
    used, cumulative, end = 0, [0], start
    while end < len(text):
        size = len(text[end].encode("utf-8", "surrogatepass"))
        if used + size > limit:
            break
        used += size
        cumulative.append(used)
        end += 1
    return end, cumulative


def _natural_end(text: str, start: int, end: int, cumulative: list[int], limit: int) -> int | None:
    window = text[start:end]
    min_bytes = limit * _MIN_FILL
    for tier in _TIERS:
        for match in reversed(list(tier.finditer(window))):
            cut = match.end()
            if cumulative[cut] < min_bytes:
                break
            if is_cluster_boundary(text, start + cut):
                return start + cut
    return None


def _cluster_end(text: str, start: int, end: int) -> int:
    for cut in range(end, max(start, end - _CLUSTER_LOOKBACK), -1):
        if is_cluster_boundary(text, cut):
            return cut
    return end  # one giant cluster (e.g. a long ZWJ chain): a code point boundary must do


def split_message(text: str, limit: int = WECOM_TEXT_LIMIT) -> list[str]:
    """Split `text` into non-empty parts of at most `limit` UTF-8 bytes; ''.join(parts) == text."""
    if limit < 4:
        raise ValueError("limit must hold at least one 4-byte character")
    parts: list[str] = []
    start = 0
    while start < len(text):
        end, cumulative = _max_end(text, start, limit)
        if end < len(text):
            end = _natural_end(text, start, end, cumulative, limit) or _cluster_end(
                text, start, end
            )
        parts.append(text[start:end])
        start = end
    return parts


def cap_parts(parts: list[str], max_parts: int | None, limit: int, notice: str) -> list[str]:
    """At most `max_parts` parts, for a channel that delivers no more to one message (微信客服:
    5 replies per customer message; the AI bot's webhook: the stream and one response_url).
    The last part kept is cut to make room for `notice`, so the member learns the rest is
    missing instead of the answer stopping mid-sentence."""
    if max_parts is None or len(parts) <= max_parts:
        return parts
    kept = parts[:max_parts]
    room = limit - len(notice.encode("utf-8"))
    if notice and room >= 4:
        kept[-1] = split_message(kept[-1], room)[0] + notice
    return kept
