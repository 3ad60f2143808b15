"""Splitting answers to WeCom's 2048-byte text limit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wecom_bridge.jobs.splitter import (
    WECOM_TEXT_LIMIT,
    cap_parts,
    is_cluster_boundary,
    split_message,
)

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"  # 👨‍👩‍👧‍👦, 25 bytes
FLAG_CN = "\U0001f1e8\U0001f1f3"  # 🇨🇳, two regional indicators
THUMBS_DARK = "\U0001f44d\U0001f3ff"  # 👍🏿
HEART = "\u2764\ufe0f"  # ❤️ with variation selector
E_ACUTE = "e\u0301"  # e + combining acute
SCOTLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def check(parts: list[str], text: str, limit: int = WECOM_TEXT_LIMIT) -> None:
    assert "".join(parts) == text
    assert all(parts), "no empty parts"
    assert all(nbytes(p) <= limit for p in parts)


def test_empty_text_has_no_parts() -> None:
    assert split_message("") == []


def test_short_text_is_one_part() -> None:
    assert split_message("你好") == ["你好"]


def test_exactly_2048_bytes_is_one_part() -> None:
    text = "a" * 2045 + "中"
    assert nbytes(text) == 2048
    assert split_message(text) == [text]


def test_2049_bytes_is_two_parts() -> None:
    text = "a" * 2049
    parts = split_message(text)
    check(parts, text)
    assert [nbytes(p) for p in parts] == [2048, 1]


def test_never_cuts_inside_a_multibyte_character() -> None:
    text = "a" + "中" * 1000  # 3001 bytes; 2048 bytes would fall inside a character
    parts = split_message(text)
    check(parts, text)
    assert nbytes(parts[0]) == 2047  # 1 + 682 * 3
    assert parts[1] == "中" * 318


def test_four_byte_characters() -> None:
    text = "\U0001f600" * 600  # 2400 bytes of 😀
    parts = split_message(text)
    check(parts, text)
    assert parts[0] == "\U0001f600" * 512


@pytest.mark.parametrize("cluster", [FAMILY, FLAG_CN, THUMBS_DARK, HEART, E_ACUTE, SCOTLAND])
def test_keeps_grapheme_clusters_whole(cluster: str) -> None:
    # Shift the cut through every position of the cluster.
    for filler in range(1, nbytes(cluster) + 1):
        text = "x" * (WECOM_TEXT_LIMIT - filler) + cluster * 3
        parts = split_message(text)
        check(parts, text)
        assert parts[0].endswith("x") or parts[0].endswith(cluster), (filler, parts[0][-12:])
        assert parts[1].startswith(cluster) or parts[1].startswith("x")


def test_flag_pairs_counted_from_the_start_of_the_run() -> None:
    flags = FLAG_CN * 3
    assert not is_cluster_boundary(flags, 1)
    assert is_cluster_boundary(flags, 2)
    assert not is_cluster_boundary(flags, 3)
    assert is_cluster_boundary(flags, 4)


def test_one_giant_cluster_is_cut_at_a_code_point() -> None:
    text = "\U0001f468" + "\u200d\U0001f468" * 400  # one ZWJ chain far beyond the limit
    parts = split_message(text)
    check(parts, text)


def test_prefers_paragraph_end() -> None:
    first = "第一段。" * 150 + "\n\n"  # 1802 bytes incl. separator
    second = "Second paragraph. It has sentences. " * 20
    text = first + second
    parts = split_message(text)
    check(parts, text)
    assert parts[0] == first


def test_prefers_line_end_over_sentence_end() -> None:
    text = "Sentence one. " * 100 + "\n" + "More text. " * 100
    parts = split_message(text)
    check(parts, text)
    assert parts[0].endswith("\n")


def test_prefers_sentence_end_over_comma() -> None:
    text = "这是一个很长的句子，" * 50 + "结束。" + "下一句，还有逗号，" * 50
    parts = split_message(text)
    check(parts, text)
    assert parts[0].endswith("结束。")


def test_ascii_period_inside_a_number_is_not_a_sentence_end() -> None:
    text = "word " * 350 + "pi is 3.14159 and " * 30
    parts = split_message(text)
    check(parts, text)
    assert not parts[0].endswith("3.")
    assert parts[0].endswith(" ")


def test_separator_stays_with_the_earlier_part() -> None:
    text = ("x" * 1500 + ". ") + "y" * 1000
    parts = split_message(text)
    assert parts == ["x" * 1500 + ". ", "y" * 1000]


def test_early_boundary_is_not_worth_a_tiny_part() -> None:
    text = "Hi.\n\n" + "字" * 1000
    parts = split_message(text)
    check(parts, text)
    assert nbytes(parts[0]) > WECOM_TEXT_LIMIT // 2


def test_long_answer_makes_several_parts_in_order() -> None:
    paragraphs = [f"第{i}段：" + "内容很长的回答。" * 40 for i in range(10)]
    text = "\n\n".join(paragraphs)
    parts = split_message(text)
    check(parts, text)
    assert len(parts) >= 5


def test_limit_below_one_character_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        split_message("abc", limit=3)


TEXT_ALPHABET = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cs",)),
    st.sampled_from(["\n", "\n\n", " ", "。", ". ", "，", FAMILY, FLAG_CN, HEART, E_ACUTE, "中"]),
)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(TEXT_ALPHABET, max_size=400), limit=st.integers(4, 200))
def test_property_join_sizes_no_empty(parts: list[str], limit: int) -> None:
    text = "".join(parts)
    check(split_message(text, limit), text, limit)


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=0, max_size=3000))
def test_property_default_limit(text: str) -> None:
    check(split_message(text), text)


def test_cap_keeps_parts_within_the_limit_and_says_the_rest_is_missing() -> None:
    parts = split_message("句子。" * 3000, 2048)
    assert len(parts) > 5
    capped = cap_parts(parts, 5, 2048, "【未完】")
    assert capped[:4] == parts[:4]
    assert capped[4].endswith("【未完】") and len(capped[4].encode()) <= 2048
    assert parts[4].startswith(capped[4].removesuffix("【未完】"))


def test_cap_leaves_an_answer_that_fits_alone() -> None:
    parts = split_message("短" * 3000, 2048)
    assert cap_parts(parts, len(parts), 2048, "【未完】") == parts
    assert cap_parts(parts, None, 2048, "【未完】") == parts
