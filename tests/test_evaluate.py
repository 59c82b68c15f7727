"""The eval verb's verdict against the base sampled colder (sdgrpo.evaluate)."""

from __future__ import annotations

import pytest

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


def test_a_difference_within_sampling_noise_is_not_called_a_win():
    """An adapter whose reward is below the base's at T=1 and whose distinct-2 is 0.001 above it has beaten nothing
    (the verdict said "beat" before); only a margin beyond two standard errors of the reward difference (each the
    samples' deviation over the root of the prompts) or 0.01 of distinct-2 counts."""
    from sdgrpo.evaluate import reward_tolerance

    base = {1.0: {"reward_mean": -3.061, "distinct_2": 0.785, "reward_std": 0.4, "prompts": 16},
            0.7: {"reward_mean": -2.2, "distinct_2": 0.6, "reward_std": 0.4, "prompts": 16}}
    noisy = {"reward_mean": -3.128, "distinct_2": 0.786, "reward_std": 0.4, "prompts": 16}
    assert reward_tolerance(base[1.0], noisy) == pytest.approx(2 * (2 * (0.4 / 4) ** 2) ** 0.5, rel=1e-12)
    sentence = verdict(noisy, base)
    assert sentence.startswith("Training made no measurable difference") and "T=1.0" in sentence, sentence
    better = dict(noisy, reward_mean=-3.061 + 0.3)  # beyond the 0.283 the noise allows
    assert verdict(better, base).startswith("Training beat"), verdict(better, base)
    lower = dict(noisy, reward_mean=-3.6, distinct_2=0.78)  # worse on reward beyond noise: did not beat T=1.0
    assert verdict(lower, base).startswith("Training did not beat") and "T=1.0" in verdict(lower, base)


def test_a_model_that_matches_a_colder_base_is_called_sharpened_not_unchanged():
    """Trained at the colder base's reward and diversity, far above the base at T=1: not "no measurable difference"
    (which it said when the nearest temperature was not 1) but "only sharpened"."""
    base = {1.0: {"reward_mean": -3.0, "distinct_2": 0.80, "reward_std": 0.4, "prompts": 16},
            0.7: {"reward_mean": -2.3, "distinct_2": 0.70, "reward_std": 0.4, "prompts": 16}}
    sentence = verdict({"reward_mean": -2.25, "distinct_2": 0.705, "reward_std": 0.4, "prompts": 16}, base)
    assert sentence.startswith("Training did not beat the temperature frontier") and "T=0.7" in sentence, sentence


def test_a_model_behind_the_base_at_its_own_temperature_is_not_called_sharpened():
    """An sft adapter below the base at T=1 on reward and on distinct-2 (one CPU run: -3.143 / 0.910 against
    -2.894 / 0.940, the base at T=0.85 at -2.465) is not "a sharpened base": the verdict names the base at T=1 and
    the colder temperature's higher reward, and no sharpening."""
    base = {1.0: {"reward_mean": -2.894, "distinct_2": 0.940, "reward_std": 0.4, "prompts": 16},
            0.85: {"reward_mean": -2.465, "distinct_2": 0.925, "reward_std": 0.4, "prompts": 16}}
    sentence = verdict({"reward_mean": -3.143, "distinct_2": 0.910, "reward_std": 0.4, "prompts": 16}, base)
    assert sentence == ("Training did not beat the base model at its own temperature: sampled at T=1.0, as the "
                        "trained model is, the base has at least the trained model's reward (-2.894 vs -3.143) and "
                        "diversity (distinct-2 0.940 vs 0.910) within sampling noise; at T=0.85 its reward is higher "
                        "still (-2.465).")
    hotter = {1.0: {"reward_mean": -3.0, "distinct_2": 0.8}, 1.2: {"reward_mean": -2.0, "distinct_2": 0.95}}
    assert "sharpened" not in verdict({"reward_mean": -2.5, "distinct_2": 0.9}, hotter)
