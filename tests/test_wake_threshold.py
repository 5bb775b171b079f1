"""How training.kws chooses the wake threshold (issue 13): the tuning confusables are synthetic clips of the
training voices that training never uses, and a false wake on them raises the wake word's threshold."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from agent.features import LABELS, WAKE_WORD
from training.data import WAKE_FRAGMENT_WORDS, Clip, _cap_synthetic_negatives, tuning_confusables
from training.kws import FULL, _choose_thresholds


def synth(word: str, index: int, split: str = "train") -> Clip:
    return Clip(f"/s/{word}/espeak_v{index}_{word}.wav", "_unknown_", f"espeak_v{index}", split, "synth")


def test_tuning_confusables_are_never_trained_on_and_leave_out_wake_fragments() -> None:
    clips = [synth(word, i) for word in ("cute", "athena", WAKE_FRAGMENT_WORDS[0]) for i in range(30)]
    clips += [synth("cute", 100 + i, split="synth_validation") for i in range(5)]
    trained = {c.path for c in _cap_synthetic_negatives(clips, 10) if c.split == "train"}
    chosen = tuning_confusables(clips, trained_per_word=10, per_word=8)
    assert len(chosen) == 16  # 8 of cute, 8 of athena
    assert not trained & {c.path for c in chosen}
    assert {c.split for c in chosen} == {"train"}
    assert not any(f"/{WAKE_FRAGMENT_WORDS[0]}/" in c.path for c in chosen)
    # the clips right after the trained ones, in the same (hash) order
    assert len(tuning_confusables(clips, trained_per_word=25, per_word=8)) == 10


def scores(peak: float, hops: int = 20) -> np.ndarray:
    """Per-hop probabilities: silence, with the wake word at ``peak`` for the middle 8 hops."""
    out = np.zeros((hops, len(LABELS)), np.float32)
    out[:, LABELS.index("_silence_")] = 1.0
    out[6:14, LABELS.index("_silence_")] = 1.0 - peak
    out[6:14, LABELS.index(WAKE_WORD)] = peak
    return out


def test_a_false_wake_on_a_tuning_confusable_raises_the_wake_threshold() -> None:
    config = replace(FULL, wake_confusable_budget=0.0)
    quiet = [scores(0.0)]
    assert _choose_thresholds(quiet, [scores(0.1)] * 5, config, 0.5)[WAKE_WORD] == config.wake_min_threshold
    raised = _choose_thresholds(quiet, [scores(0.1)] * 4 + [scores(0.7)], config, 0.5)[WAKE_WORD]
    assert 0.7 < raised <= 0.7 + config.wake_margin + 0.011
    # a budget of one false wake per five clips lets that one through
    loose = replace(config, wake_confusable_budget=0.2)
    assert _choose_thresholds(quiet, [scores(0.1)] * 4 + [scores(0.7)], loose, 0.5)[WAKE_WORD] == 0.5
