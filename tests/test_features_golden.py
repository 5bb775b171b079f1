"""Golden: agent.features re-does python_speech_features' framing, magnitude spectrum and filterbank in
numpy (so the runtime needs neither that package nor scipy); the original (dev extra) is the reference.

Equality is exact (the same float64 operations in the same order); the test would still accept 1e-6 if a numpy
release reordered the FFT, but not a change of the recipe. The int8 keyword model must answer the same on the
example recordings whichever front end computed its input.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest
from conftest import REPO_ROOT
from python_speech_features import base as psf_base
from python_speech_features import sigproc

from agent import features
from agent.audio import read_audio_file
from agent.features import FeatureParams, window_features
from agent.kws import KwsModel

PARAMS = FeatureParams()
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.wav"))


def reference_features(samples: npt.NDArray[np.int16], params: FeatureParams) -> npt.NDArray[np.float32]:
    """window_features with python_speech_features' framesig, magspec and get_filterbanks."""
    signal = samples.astype(np.float64) / features.INT16_SCALE
    signal = signal[-params.window_samples :]
    signal = np.concatenate([np.zeros(params.window_samples - len(signal)), signal])
    used = params.frame_samples + (params.num_frames - 1) * params.hop_samples
    frames = sigproc.framesig(signal[:used], params.frame_samples, params.hop_samples,
                              winfunc=features._hann_periodic)
    spectrum = sigproc.magspec(frames, params.fft_size)
    if params.filterbank == "psf":
        mel_matrix = np.asarray(psf_base.get_filterbanks(params.num_mel_bands, params.fft_size,
                                                         params.sample_rate, params.lower_hz,
                                                         params.upper_hz)).T
    else:
        mel_matrix = features._mel_matrix(params)
    mel = np.stack([row @ mel_matrix for row in spectrum])
    peak = float(np.max(np.abs(signal)))
    return features._mfcc(mel, peak, params)


def windows(samples: npt.NDArray[np.int16], hop: int = 4000) -> list[npt.NDArray[np.int16]]:
    """Every window ending on a 0.25 s grid (the first ones zero-padded), as the streaming path sees them."""
    return [samples[:end] for end in range(hop, len(samples) + 1, hop)]


def test_the_psf_filterbank_is_pythons_speech_features_own() -> None:
    params = replace(PARAMS, filterbank="psf")
    ours = features._psf_filterbank(params)
    theirs = psf_base.get_filterbanks(params.num_mel_bands, params.fft_size, params.sample_rate,
                                      params.lower_hz, params.upper_hz)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("filterbank", ["tf_htk", "psf"])
def test_features_of_the_examples_equal_the_python_speech_features_pipeline(filterbank: str) -> None:
    assert EXAMPLES, "no example recordings"
    params = replace(PARAMS, filterbank=filterbank)
    for path in EXAMPLES:
        for window in windows(read_audio_file(path)):
            ours = window_features(window, params)
            theirs = reference_features(window, params)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=path.name)


def test_int8_model_answers_the_same_on_both_front_ends() -> None:
    model = KwsModel.load(REPO_ROOT / "models" / "kws.tflite")
    compared = 0
    for path in EXAMPLES:
        for window in windows(read_audio_file(path)):
            ours = model.predict(window_features(window, model.params))
            theirs = model.predict(reference_features(window, model.params))
            np.testing.assert_array_equal(ours, theirs, err_msg=path.name)
            compared += 1
    assert compared > 50
