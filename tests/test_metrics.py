"""Collapse metrics against values computed by hand."""

import gzip

import pytest

from sdgrpo.metrics import collapse_metrics, compression_ratio, distinct_n, frac_equal_reward_groups, seq_rep_n


def test_distinct_n_by_hand():
    comps = [[1, 2, 3, 1], [1, 2, 2]]
    # unigrams: 1,2,3,1,1,2,2 -> 3 unique / 7
    assert distinct_n(comps, 1) == pytest.approx(3 / 7)
    # bigrams: (1,2),(2,3),(3,1),(1,2),(2,2) -> 4 unique / 5
    assert distinct_n(comps, 2) == pytest.approx(4 / 5)
    assert distinct_n([[1]], 2) is None


def test_seq_rep_4_by_hand():
    assert seq_rep_n([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(1 - 4 / 5)  # 5 grams, 4 unique
    assert seq_rep_n([7, 7, 7, 7, 7, 7], 4) == pytest.approx(1 - 1 / 3)
    assert seq_rep_n([1, 2, 3], 4) == 0.0


def test_compression_ratio():
    text = "abc " * 100
    assert compression_ratio(text) == pytest.approx(400 / len(gzip.compress(text.encode(), mtime=0)))
    assert compression_ratio("") is None
    assert compression_ratio("the the the the the the the the") > compression_ratio("a quick brown fox jumps")


def test_collapse_metrics_batch_and_groups():
    eos = 0
    ids = [[5, 6, 0], [5, 5, 5, 5, 5], [7, 8, 0], [9]]
    m = collapse_metrics(ids, ["a b", "a a a a a", "c d", "e"], {eos}, group_size=2)
    assert m["length"] == pytest.approx((3 + 5 + 3 + 1) / 4)
    assert m["eos_rate"] == pytest.approx(0.5)
    # content (EOS dropped): [5,6], [5,5,5,5,5], [7,8], [9] -> unigrams 5,6,5,5,5,5,5,7,8,9: 5 unique / 10
    assert m["distinct_1"] == pytest.approx(5 / 10)
    # seq-rep-4: only [5,5,5,5,5] has 4-grams: 2 grams, 1 unique -> 0.5; mean over 4 completions
    assert m["seq_rep_4"] == pytest.approx(0.5 / 4)
    # group 1 unigrams 5,6,5,5,5,5,5 -> 2/7; group 2: 7,8,9 -> 1
    assert m["group_distinct_1"] == pytest.approx((2 / 7 + 1) / 2)


def test_frac_equal_reward_groups():
    assert frac_equal_reward_groups([1.0, 1.0, -2.0, -1.0, None, 3.0], 2) == pytest.approx(2 / 3)
