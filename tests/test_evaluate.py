"""The eval verb's verdict against the base sampled colder (sdgrpo.evaluate)."""

from __future__ import annotations

from sdgrpo.evaluate import verdict


def test_verdict_sentences():
    trained = {"reward_mean": -2.5, "distinct_2": 0.7}
    dominated = verdict(trained, {1.0: {"reward_mean": -3.0, "distinct_2": 0.9},
                                  0.7: {"reward_mean": -2.3, "distinct_2": 0.75}})
    assert dominated.startswith("Training did not beat") and "T=0.7" in dominated
    beat = verdict(trained, {1.0: {"reward_mean": -3.0, "distinct_2": 0.9},
                             0.5: {"reward_mean": -2.0, "distinct_2": 0.5}})
    assert beat.startswith("Training beat")
    # the trained model's numbers equal to a temperature's (an adapter that changed nothing): said so, not "sharpened"
    same = verdict(trained, {1.0: dict(trained), 0.7: {"reward_mean": -2.6, "distinct_2": 0.6}})
    assert same.startswith("Training made no measurable difference") and "T=1.0" in same
