"""bench/openwakeword_stream.py, the CPU anchor of bench/voice_bench.py: its re-done openWakeWord streaming
pipeline and the lean run of the same models agree, so the side-by-side compares the same computation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO_ROOT

from agent.audio import read_audio_file
from bench.openwakeword_stream import CHUNK, LeanOpenWakeWordStream, OpenWakeWordStream, models_present

PEERS = REPO_ROOT.parent / "shared" / "peers" / "openwakeword"

pytestmark = pytest.mark.skipif(not models_present(PEERS), reason="../shared/peers/openwakeword is absent")


def test_the_lean_run_scores_as_the_package_pipeline_once_its_buffers_hold_real_audio() -> None:
    audio = read_audio_file(REPO_ROOT / "examples" / "demo_commands.wav")
    package, lean = OpenWakeWordStream(PEERS), LeanOpenWakeWordStream(PEERS)
    chunks = [audio[start : start + CHUNK] for start in range(0, len(audio) - CHUNK + 1, CHUNK)]
    theirs = np.array([package.predict(chunk) for chunk in chunks])
    ours = np.array([lean.predict(chunk) for chunk in chunks])
    # 76 mel frames (10 chunks) and then 16 embeddings (16 chunks) of start-up buffers differ by design.
    warm = 10 + 16
    assert len(chunks) > warm + 50
    np.testing.assert_allclose(ours[warm:], theirs[warm:], atol=1e-6)
    assert (theirs[:5] == 0).all()  # the package zeroes its first five predictions
    package.reset()
    np.testing.assert_array_equal([package.predict(chunk) for chunk in chunks], theirs)  # reset: a new stream
