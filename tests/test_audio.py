"""Audio sources: resampling, the bounded ring buffer, WAV/FLAC files (good and bad), raw stdin, PortAudio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.audio import (
    EndOfAudio,
    FileSource,
    MicSource,
    Resampler,
    RingBuffer,
    StdinSource,
    create_source,
    import_sounddevice,
    read_audio_file,
)
from agent.config import AudioSection
from agent.errors import AudioError

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "computer_heat_up.wav"


def tone(rate: int, seconds: float, hz: float = 1000.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * hz * t)


def dominant_hz(samples: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


# ----------------------------------------------------------------------------- resampler


@pytest.mark.parametrize("rate", [8000, 22050, 32000, 44100, 48000])
def test_resampling_keeps_a_tone_and_its_level(rate: int) -> None:
    out = Resampler(rate).process(tone(rate, 1.0))
    assert len(out) == 16000
    middle = out[2000:14000]
    assert dominant_hz(middle) == pytest.approx(1000.0, abs=2.0)
    assert middle.std() * np.sqrt(2) == pytest.approx(0.5, rel=0.01)


def test_resampling_removes_what_16_khz_cannot_carry() -> None:
    out = Resampler(48000).process(tone(48000, 1.0, hz=12000.0))  # above the new Nyquist frequency
    assert np.abs(out[2000:14000]).max() < 0.01


def test_resampling_in_blocks_equals_resampling_at_once() -> None:
    signal = np.random.default_rng(3).standard_normal(44100 * 2) * 0.1
    whole = Resampler(44100).process(signal)
    resampler = Resampler(44100)
    rng = np.random.default_rng(4)
    parts, start = [], 0
    while start < len(signal):
        size = int(rng.integers(1, 3000))
        parts.append(resampler.process(signal[start : start + size]))
        start += size
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-12)


def _resample_reference(rate_in: int, blocks: list[np.ndarray]) -> list[np.ndarray]:
    """The resampler's arithmetic with its gather and tap matrices built afresh for every block."""
    resampler = Resampler(rate_in)
    up, down, taps, phases = resampler.up, resampler.down, resampler._taps, resampler._phases
    history, consumed, next_out = np.zeros(taps - 1), 0, 0
    outputs = []
    for block in blocks:
        buffer = np.concatenate([history, block])
        total_in = consumed + len(block)
        count = max(0, (total_in * up - 1) // down - next_out + 1)
        m = next_out + np.arange(count)
        newest = m * down // up - (consumed - (taps - 1))
        gather = newest[:, None] - np.arange(taps)[None, :]
        outputs.append(np.einsum("ij,ij->i", buffer[gather], phases[m * down % up]))
        next_out += count
        history, consumed = buffer[len(buffer) - (taps - 1) :], total_in
    return outputs


@pytest.mark.parametrize("rate", [44100, 48000, 22050])
def test_resampling_reuses_its_block_plan_with_identical_output(rate: int) -> None:
    """Equal blocks (a microphone's) reuse the last block's gather and taps; other sizes rebuild them: the
    output equals the plain computation bit for bit either way."""
    rng = np.random.default_rng(rate)
    sizes = [rate // 10] * 12 + [int(n) for n in rng.integers(1, 3000, 20)] + [rate // 10] * 5 + \
        [rate // 20] * 6
    blocks = [rng.standard_normal(size) * 0.1 for size in sizes]
    resampler = Resampler(rate)
    got = []
    plans = []
    for block in blocks:
        got.append(resampler.process(block))
        plans.append(resampler._plan)
    assert all(plan is plans[1] for plan in plans[1:12])  # 100 ms blocks: one plan after the first block
    for mine, reference in zip(got, _resample_reference(rate, blocks), strict=True):
        np.testing.assert_array_equal(mine, reference)


def test_16_khz_passes_through_unchanged() -> None:
    signal = np.random.default_rng(5).standard_normal(1000)
    np.testing.assert_array_equal(Resampler(16000).process(signal), signal)


# ----------------------------------------------------------------------------- ring buffer


def test_ring_buffer_drops_the_oldest_and_counts() -> None:
    ring = RingBuffer(10)
    ring.write(np.arange(6, dtype=np.int16), now=1.0)
    ring.write(np.arange(6, 12, dtype=np.int16), now=2.0)
    assert ring.dropped == 2
    out = ring.read(timeout=0.0)
    assert out is not None
    np.testing.assert_array_equal(out, np.arange(2, 12))
    assert ring.read(timeout=0.0) is None
    assert ring.last_write_mono == 2.0


def test_ring_buffer_block_larger_than_capacity_keeps_its_newest_part() -> None:
    ring = RingBuffer(4)
    ring.write(np.arange(3, dtype=np.int16), now=0.0)
    ring.write(np.arange(10, 20, dtype=np.int16), now=0.0)
    assert ring.dropped == 3 + 6
    out = ring.read(timeout=0.0)
    assert out is not None
    np.testing.assert_array_equal(out, [16, 17, 18, 19])


def test_ring_buffer_wraps_and_reads_in_order() -> None:
    ring = RingBuffer(7)
    expected: list[int] = []
    got: list[int] = []
    value = 0
    for size in (3, 5, 2, 6, 1, 4):
        block = np.arange(value, value + size, dtype=np.int16)
        value += size
        ring.write(block, now=0.0)
        expected.extend(block.tolist())
        out = ring.read(timeout=0.0, max_samples=4)
        got.extend(out.tolist() if out is not None else [])
    while (out := ring.read(timeout=0.0)) is not None:
        got.extend(out.tolist())
    # Whatever was not dropped arrives in order, and drops + reads account for every sample.
    assert got == sorted(got)
    assert len(got) + ring.dropped == len(expected)


def test_ring_buffer_reader_wakes_when_data_arrives() -> None:
    ring = RingBuffer(100)
    timer = threading.Timer(0.05, lambda: ring.write(np.ones(5, dtype=np.int16), now=0.0))
    timer.start()
    out = ring.read(timeout=5.0)
    timer.join()
    assert out is not None and len(out) == 5


# ----------------------------------------------------------------------------- files


def read_all(source: FileSource) -> tuple[np.ndarray, int]:
    parts = []
    chunks = 0
    with source:
        for chunk in source.chunks():
            assert chunk.sample_rate == 16000 and chunk.samples.dtype == np.int16
            parts.append(chunk.samples)
            chunks += 1
    return np.concatenate(parts), chunks


def test_a_16_khz_wav_is_delivered_sample_for_sample(tmp_path: Path) -> None:
    samples = (np.random.default_rng(1).standard_normal(16000) * 3000).astype(np.int16)
    sf.write(tmp_path / "a.wav", samples, 16000, subtype="PCM_16")
    out, chunks = read_all(FileSource(tmp_path / "a.wav", block_seconds=0.1))
    np.testing.assert_array_equal(out, samples)
    assert chunks == 10


def test_a_stereo_44k_flac_becomes_16_khz_mono(tmp_path: Path) -> None:
    left = tone(44100, 1.0, hz=440.0, amplitude=0.4)
    stereo = np.stack([left, left], axis=1)
    sf.write(tmp_path / "b.flac", stereo, 44100, subtype="PCM_16")
    out = read_audio_file(tmp_path / "b.flac")
    assert len(out) == 16000
    assert dominant_hz(out[2000:14000].astype(float)) == pytest.approx(440.0, abs=2.0)
    assert np.abs(out).max() == pytest.approx(0.4 * 32768, rel=0.02)


def test_a_float_wav_at_8_khz(tmp_path: Path) -> None:
    sf.write(tmp_path / "c.wav", tone(8000, 0.5, hz=300.0), 8000, subtype="FLOAT")
    out = read_audio_file(tmp_path / "c.wav")
    assert len(out) == 8000
    assert dominant_hz(out[1000:7000].astype(float)) == pytest.approx(300.0, abs=3.0)


def test_opposite_channels_cancel_when_downmixed(tmp_path: Path) -> None:
    left = tone(16000, 0.5)
    sf.write(tmp_path / "d.wav", np.stack([left, -left], axis=1), 16000)
    assert np.abs(read_audio_file(tmp_path / "d.wav")).max() <= 1


def write_truncated(tmp_path: Path, suffix: str) -> Path:
    full = tmp_path / f"full{suffix}"
    sf.write(full, (tone(16000, 1.0) * 10000).astype(np.int16), 16000)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    return cut


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_a_truncated_file_is_a_clear_error(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(AudioError, match=r"truncated"):
        read_audio_file(write_truncated(tmp_path, suffix))


def test_a_zero_length_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"cannot read audio file .*empty\.wav: Format not recognised"):
        read_audio_file(tmp_path / "empty.wav")


def test_a_wav_without_samples_is_a_clear_error(tmp_path: Path) -> None:
    sf.write(tmp_path / "nothing.wav", np.zeros(0, dtype=np.int16), 16000)
    with pytest.raises(AudioError, match="holds no audio"):
        read_audio_file(tmp_path / "nothing.wav")


def test_garbage_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "noise.flac").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(AudioError, match=r"cannot read audio file .*noise\.flac"):
        read_audio_file(tmp_path / "noise.flac")


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="audio file not found"):
        read_audio_file(tmp_path / "nope.wav")


def test_real_time_pace(tmp_path: Path) -> None:
    sf.write(tmp_path / "half.wav", np.zeros(8000, dtype=np.int16), 16000)
    source = FileSource(tmp_path / "half.wav", realtime=True, block_seconds=0.1)
    started = time.monotonic()
    out, _ = read_all(source)
    elapsed = time.monotonic() - started
    assert len(out) == 8000
    assert elapsed >= 0.4  # the last block is due 0.4 s after the first
    assert source.started_mono is not None


def test_real_time_chunks_carry_their_capture_time(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", np.zeros(4800, dtype=np.int16), 16000)
    source = FileSource(tmp_path / "a.wav", realtime=True, block_seconds=0.1)
    with source:
        times = [chunk.t_mono for chunk in source.chunks()]
    assert source.started_mono is not None
    assert [round(t - source.started_mono, 3) for t in times] == [0.1, 0.2, 0.3]


# ----------------------------------------------------------------------------- stdin


def test_stdin_delivers_raw_samples_and_ends() -> None:
    read_fd, write_fd = os.pipe()
    samples = np.arange(-500, 500, dtype=np.int16)
    raw = samples.astype("<i2").tobytes()
    with os.fdopen(read_fd, "rb", buffering=0) as reader:
        source = StdinSource(reader, block_seconds=0.01)
        source.open()
        assert source.read(timeout=0.01) is None  # nothing yet is not the end
        os.write(write_fd, raw[:301])  # an odd number of bytes: half a sample waits
        got = []
        chunk = source.read(timeout=1.0)
        assert chunk is not None
        got.append(chunk.samples)
        os.write(write_fd, raw[301:])
        os.close(write_fd)
        with pytest.raises(EndOfAudio):
            while True:
                chunk = source.read(timeout=1.0)
                if chunk is not None:
                    got.append(chunk.samples)
        np.testing.assert_array_equal(np.concatenate(got), samples)


# ----------------------------------------------------------------------------- microphone


def test_create_source_parses_the_spec(tmp_path: Path) -> None:
    audio = AudioSection(realtime=False)
    source = create_source(f"file:{tmp_path / 'x.wav'}", audio)
    assert isinstance(source, FileSource) and source.path == tmp_path / "x.wav" and not source.realtime
    assert isinstance(create_source("stdin", audio), StdinSource)
    assert isinstance(create_source("mic", AudioSection(device="usb")), MicSource)
    with pytest.raises(AudioError, match="unknown audio source"):
        create_source("speaker", audio)


def test_a_missing_microphone_is_a_clear_error() -> None:
    import_sounddevice()  # PortAudio itself must be there (make setup installs libportaudio2)
    source = MicSource("no-such-microphone-xyz")
    with pytest.raises(AudioError, match="no audio input device matching 'no-such-microphone-xyz'"):
        source.open()
    source.close()
    with pytest.raises(AudioError, match="not open"):
        source.read(0.01)


def test_devices_command_lists_input_devices() -> None:
    result = subprocess.run([sys.executable, "-m", "agent", "devices"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "input devices" in result.stdout


ALSA_FILE_MIC = """
pcm.testmic {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{raw}"
    format "raw"
}}
"""

MIC_SCRIPT = textwrap.dedent("""
    import json, time
    import numpy as np
    from agent.audio import MicSource
    source = MicSource("testmic", buffer_seconds=0.5)
    source.open()
    # A reader that falls behind: wait until the device delivered three times what the buffer holds.
    deadline = time.monotonic() + 20.0
    while source.stats()["captured_samples"] < 3 * 8000 and time.monotonic() < deadline:
        time.sleep(0.01)
    chunks, samples, first = 0, 0, None
    for _ in range(3):
        chunk = source.read(0.5)
        if chunk is not None:
            chunks += 1
            samples += len(chunk.samples)
            if first is None:
                first = chunk.samples[:8].tolist()
    stats = source.stats()
    source.close()
    print(json.dumps({"chunks": chunks, "samples": samples, "first": first, "name": source.device_name,
                      **stats}))
""")


def test_a_real_portaudio_stream_feeds_the_bounded_buffer(tmp_path: Path) -> None:
    """PortAudio -> ALSA's file plugin (capture from a raw file on an unpaced null device) -> our callback.
    The device runs far faster than real time, so the ring buffer must drop the oldest audio and count it."""
    import_sounddevice()
    raw = tmp_path / "mic.raw"
    np.full(16000 * 4, 1234, dtype="<i2").tofile(raw)
    (tmp_path / ".asoundrc").write_text(ALSA_FILE_MIC.format(raw=raw), encoding="utf-8")
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", MIC_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    if result.returncode != 0 and "no audio input device matching 'testmic'" in result.stderr:
        pytest.skip("this ALSA build has no file plugin")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report, result.stderr[-2000:])  # shown when an assertion below fails
    assert report["name"] == "testmic"
    assert report["chunks"] > 0
    assert report["first"] == [1234] * 8
    assert report["captured_samples"] >= 3 * 8000
    assert report["dropped_samples"] >= 2 * 8000  # the oldest audio went, counted
    # Every read returns at most the ring's capacity (0.5 s), whatever the device delivered meanwhile.
    assert report["samples"] <= report["chunks"] * 8000


class _StoppedStream:
    """Stands in for a PortAudio stream whose device vanished (no unplugging on a build machine)."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("active", "message"), [(False, "stopped \\(unplugged\\?\\)"),
                                                 (True, "no audio from microphone")])
def test_an_unplugged_or_silent_microphone_is_an_error_not_a_hang(active: bool, message: str) -> None:
    now = [100.0]
    source = MicSource("usb", clock=lambda: now[0])
    source._ring = RingBuffer(1600)
    source._stream = _StoppedStream(active)
    source._opened_mono = 100.0
    source._ring.write(np.zeros(160, dtype=np.int16), now=100.0)
    assert source.read(timeout=0.0) is not None
    now[0] = 100.5
    if active:
        assert source.read(timeout=0.0) is None  # a short gap is just a gap
        now[0] = 103.0
    with pytest.raises(AudioError, match=message):
        source.read(timeout=0.0)


def test_ring_buffer_reader_waits_for_a_whole_block() -> None:
    ring = RingBuffer(100)
    ring.write(np.ones(10, dtype=np.int16), now=0.0)
    timer = threading.Timer(0.05, lambda: ring.write(np.ones(30, dtype=np.int16), now=0.0))
    timer.start()
    out = ring.read(timeout=5.0, min_samples=40)
    timer.join()
    assert out is not None and len(out) == 40
    ring.write(np.ones(5, dtype=np.int16), now=0.0)
    out = ring.read(timeout=0.01, min_samples=40)  # after the timeout: whatever is there
    assert out is not None and len(out) == 5


def test_a_read_can_ask_for_more_audio_than_the_block(tmp_path: Path) -> None:
    """``read(timeout, seconds=...)``: a file source hands out that much (the rest of the file at the end),
    stdin reads up to that much, the microphone's ring waits for that much; nothing is lost or repeated."""
    samples = (np.random.default_rng(2).standard_normal(15000) * 3000).astype(np.int16)
    path = tmp_path / "short.wav"
    sf.write(path, samples, 16000, subtype="PCM_16")
    source = FileSource(path, block_seconds=0.1)
    got = []
    with source:
        for seconds in (0.3, None, 0.3, 0.3):
            chunk = source.read(timeout=1.0, seconds=seconds)
            assert chunk is not None
            got.append(chunk.samples)
        with pytest.raises(EndOfAudio):
            source.read(timeout=1.0, seconds=0.3)
    assert [len(g) for g in got] == [4800, 1600, 4800, 3800]
    np.testing.assert_array_equal(np.concatenate(got), samples)

    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb", buffering=0) as reader:
        stdin = StdinSource(reader, block_seconds=0.01)
        stdin.open()
        os.write(write_fd, samples[:4000].astype("<i2").tobytes())
        chunk = stdin.read(timeout=1.0, seconds=0.3)
        assert chunk is not None and len(chunk.samples) == 4000  # more than a 10 ms block, all there was
        os.close(write_fd)

    ring = RingBuffer(16000)
    writes = [threading.Timer(0.02 * (i + 1), lambda: ring.write(np.ones(800, dtype=np.int16), now=0.0))
              for i in range(6)]
    for timer in writes:
        timer.start()
    block = ring.read(timeout=5.0, min_samples=4800)  # woken once 4800 are there, not by each 800
    for timer in writes:
        timer.join()
    assert block is not None and len(block) == 4800
