"""The voice stage: audio source -> streaming features -> keyword model -> recognizer -> intents -> actions.

:class:`VoicePipeline` is the whole recognition path as one synchronous object (samples in, detections and
intents out); the daemon and ``home-agent transcribe`` both use it, so offline evaluation measures exactly
what runs live. :class:`VoiceStage` runs it on its own thread, off the audio thread: it reads the source,
honours the mute switch (a muted microphone is closed), reopens a missing or unplugged microphone every
``audio.retry_interval`` seconds, and turns each intent into MQTT messages (intent JSON, Hermes intent, Home
Assistant event; never retained) and then an action request. Everything published for an intent expires
with the action's ``ttl``: when the broker is down longer than that, the messages are dropped (and counted
by the MQTT link), never sent late.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from agent.audio import SAMPLE_RATE, AudioSource, EndOfAudio
from agent.config import Config, VoiceSection
from agent.errors import ActionError, AudioError, ConfigError, HomeAgentError
from agent.features import StreamingFeatures
from agent.intent_payloads import encode, event_payload, hermes_payload, intent_payload
from agent.kws import HOP_SECONDS, KwsModel, hop_samples, model_hop_seconds
from agent.messages import ActionRequest, Detection, Intent, Scores
from agent.ports import Publisher
from agent.recognizer import (
    MAX_POSTERIOR,
    Command,
    CommandMatcher,
    PipelineOutput,
    Recognizer,
    RecognizerSettings,
    check_vocabulary,
    effective_thresholds,
)
from agent.sequence import RecentHops
from agent.topics import Topics

if TYPE_CHECKING:
    from agent.adaptation import Adaptation
    from agent.arbitration import GroupArbiter
    from agent.capture import WakeCapture

log = logging.getLogger(__name__)

# The words that can continue a phrase after the wake word are averaged over 0.4 s instead of the model's
# own smoothing (0.5 s): a command fires sooner. Unexpected words keep the full smoothing; model metadata
# ``listening_smoothing_seconds`` overrides it.
LISTENING_SMOOTHING = 0.4
# Once a word has opened or advanced a wake window, the model sees only what follows the first pause after
# it: the audio before counts as silence. Otherwise the words still in its 1 s window ("computer", the "heat"
# of "heat up") hold the next word back. A pause: PAUSE_FRAMES or more feature frames (20 ms apart) PAUSE_DB
# below the loudest frame of the last second, then sound again; the silence ends one frame into it (before
# the next word's onset: cutting into a word costs far more than keeping a little of the pause). Words
# spoken without a pause (under 60 ms) are heard as before.
# Held-out real speakers through this pipeline (bench/voice_bench.py recognition_latency, models/kws.tflite
# 41cbe029), command end -> intent p90 / right / wrong intents:
#                               one word after "computer"    second of two words 0.05-0.3 s apart
#   0.3 s, no silencing (old)   0.29 s  72.2 %  2.6 %          0.41 s  57.1 %  4.3 %
#   0.3 s, silencing            0.12 s  72.8 %  3.0 %          0.15 s  62.5 %  5.2 %
#   0.4 s, silencing (this)     0.18 s  72.8 %  2.3 %          0.22 s  61.3 %  4.2 %
# (0.2 s without silencing: another command word fired first twice as often as at 0.3 s.) Fewer wrong
# actions were worth 60-70 ms of the tail.
# Once the word after such a pause is over (its last PAUSE_FRAMES frames PAUSE_DB below its loudest), it no
# longer waits for the 0.4 s average: RecognizerSettings.settled_seconds. On the training speakers (the same
# construction over split "train", 2220 commands each), p90 / right / wrong / none:
#                               one word after "computer"         second of two words
#   0.4 s                       0.210 s  1800  81  339            0.234 s  1436  124  660
#   0.4 s, settled words        0.158 s  1800  82  338            0.170 s  1439  125  656
# (every command fired at the same hop or earlier; 5 of 4440 outcomes changed, all from "none").
PAUSE_FRAMES = 3
PAUSE_DB = 20.0
READ_TIMEOUT = 0.25  # the stage loop turns at least this often (stop requests, heartbeats)
# While no wake window is open, the stage reads audio in blocks of this much (one per 100 ms otherwise): the
# hops of a block then run back to back on a warm CPU instead of each waking a CPU gone cold in the 100 ms
# between them (bench/results/voice.json daemon_realtime). Only the wake word waits for its block (up to 0.4 s
# longer); once a window is open every 100 ms is fed at once, so a command's latency is unchanged: over 1978
# commands of the training speakers (bench/voice_bench.py recognition_latency's construction, fed in these
# blocks), no intent came inside the wake word's block, and every latency was the same with 0.3 s, 0.4 s,
# 0.5 s or no blocks. What is detected, and every capture time, is the same. 0.5 s rather than 0.3 s: the
# whole daemon's CPU per audio second -7 % on the demo, -10 % on speech without the wake word.
# While a window is open, the stage reads two hops at once when nothing can happen on the first
# (VoicePipeline.read_seconds): the hop that may bring a word is always the last of its read, so no intent
# comes later, and the stage wakes about half as often while a command is spoken.
IDLE_READ_SECONDS = 0.5
HEARTBEAT_LIMIT = 10.0  # healthy() is False when the loop has not turned for this long
# Audio fed after the end of a finite stream so that a word at its very end still passes through the whole
# window and the smoothing. Quiet dither rather than digital zero, like a real room.
TAIL_SECONDS = 1.2
TAIL_DITHER = 3.0  # int16 LSB (about -80 dBFS)
DRAIN_MARGIN = 0.5  # exit-at-end: after the last message's TTL, wait this much longer for the link
# A file or stdin replay starts once the broker is connected (at most service.ready_grace, capped here) and
# retained device states had a moment to arrive: a thermostat's current setpoint must be known for "heat up".
MAX_ONLINE_WAIT = 10.0
RETAINED_SETTLE = 0.3


def pause_start(first_frame: int, energies: npt.NDArray[np.float64], search_from: int, min_frames: int,
                floor_db: float) -> int | None:
    """The index of the first frame of the first pause that starts at or after frame ``search_from`` and is
    over (speech follows it): a run of at least ``min_frames`` frames whose energy is ``floor_db`` or more
    below the loudest of ``energies`` (frame ``first_frame`` onwards), then a louder frame. None while there
    is none: the quiet after the last word is not a pause yet."""
    loudest = float(energies.max()) if len(energies) else 0.0
    if loudest <= 0.0:
        return None
    quiet = energies < loudest * 10 ** (-floor_db / 10)
    run = 0
    for index in range(max(0, search_from - first_frame), len(energies)):
        if quiet[index]:
            run += 1
        elif run >= min_frames:
            return first_frame + index - run
        else:
            run = 0
    return None


def word_over(energies: npt.NDArray[np.float64], min_frames: int, floor_db: float) -> bool:
    """Whether the sound in ``energies`` (the frames since a pause) has ended: there is sound, and its last
    ``min_frames`` frames are ``floor_db`` or more below its loudest (the start of the next pause)."""
    if len(energies) <= min_frames:
        return False
    loudest = float(energies.max())
    return loudest > 0.0 and bool(np.all(energies[-min_frames:] < loudest * 10 ** (-floor_db / 10)))


def tail_padding(seconds: float = TAIL_SECONDS, seed: int = 0) -> npt.NDArray[np.int16]:
    """Deterministic near-silence appended to finite streams."""
    rng = np.random.default_rng(seed)
    return np.round(rng.normal(0.0, TAIL_DITHER, round(seconds * SAMPLE_RATE))).astype(np.int16)


def commands_from_config(config: Config) -> list[Command]:
    """``[[voice.commands]]`` with each action's ``confirm`` flag."""
    return [Command(command.words, command.action, config.actions[command.action].confirm)
            for command in config.voice.commands]


class VoicePipeline:
    """Samples -> StreamingFeatures -> KwsModel (every hop) -> Recognizer -> CommandMatcher. Not thread-safe.

    Raises ConfigError when the configuration names words the model does not know."""

    def __init__(self, model: KwsModel, voice: VoiceSection, commands: Sequence[Command] = (),
                 hop_seconds: float = HOP_SECONDS, adaptation: Adaptation | None = None) -> None:
        params = model.params
        if params.sample_rate != SAMPLE_RATE:
            raise ConfigError(f"the keyword model expects {params.sample_rate} Hz audio; home-agent delivers "
                              f"{SAMPLE_RATE} Hz")
        if commands:
            check_vocabulary(model.labels, voice.wake_word, commands)
        thresholds = effective_thresholds(model.thresholds, model.labels, voice.thresholds)
        self.model = model
        self.voice = voice
        self.commands = tuple(commands)
        self.adaptation = adaptation  # household heads (agent.adaptation); the model then has its embedding
        # This stream's recent hops, which the adaptation's sequence gates match (the adaptation keeps none: a
        # reload's new pipeline may share it with the running one); without an adaptation it stays empty
        self.recent_hops = adaptation.recent_hops() if adaptation is not None else RecentHops(1)
        # A whole number of feature hops, so every model window ends on a hop boundary.
        self.hop_samples = hop_samples(hop_seconds, params)
        self._frames_per_hop = self.hop_samples // params.hop_samples  # the new feature frames of a hop
        # The hops of a block go into the features in one push of up to an idle read's worth (one FFT call
        # for all their frames); each hop is then analysed as if pushed alone (StreamingFeatures' ``behind``).
        self._batch_hops = max(1, round(IDLE_READ_SECONDS * SAMPLE_RATE / self.hop_samples))
        self.settings = RecognizerSettings(
            labels=model.labels,
            thresholds=thresholds,
            smoothing_seconds=model.smoothing_seconds,
            refractory_seconds=voice.refractory if voice.refractory is not None else model.refractory_seconds,
            window_seconds=params.window_seconds,
            listening_smoothing_seconds=_listening_smoothing(model),
        )
        # The second-stage wake verifier (agent.verifier), for the word it was trained on: it judges the
        # keyword model's own wake decisions. One a household's enrolment raised (agent.adaptation's boost
        # on a hop of the smoothing time) stands unjudged: the verifier never heard that voice.
        self.verifier = model.verifier if model.verifier is not None and \
            model.verifier.word == voice.wake_word else None
        self._verified_index = model.labels.index(voice.wake_word) if self.verifier is not None else -1
        self._raised_at: float | None = None  # audio time of the last hop the household raised the wake word
        # read_seconds() may skip a wake-up only if no posterior can exceed what Recognizer.may_detect_next
        # assumes (the household heads' scores are probabilities too)
        ceiling = model.max_output
        self._posteriors_bounded = ceiling is not None and ceiling <= MAX_POSTERIOR
        self.rejected_wakes = 0
        history = self.verifier.frames if self.verifier is not None else 0
        self.features = StreamingFeatures(params, behind=(self._batch_hops - 1) * self.hop_samples,
                                          history_frames=history)
        self.recognizer = Recognizer(self.settings)
        self.matcher = CommandMatcher(voice.wake_word, self.commands, wake_window=voice.wake_window,
                                      confirm_window=voice.confirm_window)
        self._pending = np.zeros(0, dtype=np.int16)
        self._samples = 0  # samples pushed into the features (whole hops)
        self._pause_search_from: int | None = None  # feature frame from which to look for a pause
        self._silence_before: int | None = None  # sample position: the model sees silence before it
        self.invocations = 0
        # When set, called every hop with the model's posteriors, the smoothed scores the recognizer compared
        # with the thresholds, and the word heard on this hop: `transcribe --plot` records them.
        self.on_hop: Callable[[Scores, npt.NDArray[np.float64], Detection | None], None] | None = None

    @property
    def hop_seconds(self) -> float:
        return self.hop_samples / SAMPLE_RATE

    @property
    def listening(self) -> bool:
        """A wake window (or a confirmation) is open: the next words are a command's."""
        return self.matcher.state != "idle"

    def read_seconds(self) -> float | None:
        """How much audio the voice stage reads next (None: its source's usual block, one hop):
        IDLE_READ_SECONDS while no wake window is open; while one is, two hops when nothing can happen on the
        next one (no word can reach its threshold there, whatever the model says, and no phrase or window is
        due), so the stage wakes once for both, else one. Every hop that can bring a word or an intent is the
        last of its read, handled as soon as it is heard: the latency is unchanged."""
        if not self.listening:
            return IDLE_READ_SECONDS
        following = (self._samples + self.hop_samples) / SAMPLE_RATE  # the next hop's audio time
        if self._posteriors_bounded and self.matcher.quiet_at(following) and \
                not self.recognizer.may_detect_next(round(following, 6)):  # as its Scores will say
            return 2 * self.hop_seconds
        return None

    @property
    def silence_before(self) -> int | None:
        """Sample position (since reset) before which the model now hears silence; None: its whole window."""
        return self._silence_before

    @property
    def t_audio(self) -> float:
        """Seconds of audio processed (whole hops) since the last reset."""
        return self._samples / SAMPLE_RATE

    def reset(self) -> None:
        """Start a new stream at audio time 0 (a new file, or after a gap such as mute or a reopened mic)."""
        self.features.reset()
        self.recognizer.reset()
        self.matcher.reset()
        self._pending = np.zeros(0, dtype=np.int16)
        self._samples = 0
        self._pause_search_from = None
        self._silence_before = None
        self._raised_at = None
        self.recent_hops.reset()

    def feed(self, samples: npt.NDArray[np.int16], *, mono_end: float | None = None,
             wall_end: float | None = None) -> PipelineOutput:
        """Process a block of 16 kHz int16 samples (any length; a partial hop waits for the next block).

        ``mono_end``/``wall_end``: when the block's last sample was captured (monotonic / wall clock); intents
        get the capture time of the hop that completed them. Without them, audio time stands in."""
        output = PipelineOutput()
        buffer = np.concatenate([self._pending, np.asarray(samples, dtype=np.int16)]) if len(self._pending) \
            else np.asarray(samples, dtype=np.int16)
        hop = self.hop_samples
        whole = len(buffer) // hop * hop
        batch = self._batch_hops * hop
        for start in range(0, whole, batch):
            stop = min(start + batch, whole)
            self.features.push(buffer[start:stop])
            idle = self._idle_posteriors((stop - start) // hop)
            for index, offset in enumerate(range(start, stop, hop)):
                self._samples += hop
                behind = (len(buffer) - offset - hop) / SAMPLE_RATE  # audio after this hop in the block
                t_audio = self.t_audio
                mono = mono_end - behind if mono_end is not None else t_audio
                wall = wall_end - behind if wall_end is not None else t_audio
                # From the first hop on, like the evaluation: until a whole window has been heard its front
                # counts as digital silence (as short training clips were padded), so a word at the very
                # start of a stream or a clip is seen at every position in the window, not only at its left
                # edge.
                self._invoke(t_audio, mono, wall, output, None if idle is None else idle[index])
                output.events.extend(self.matcher.tick(t_audio, wall_time=wall, mono_time=mono))
        self._pending = buffer[whole:].copy()
        return output

    def _idle_posteriors(self, hops: int) -> npt.NDArray[np.float32] | None:
        """The model's posteriors for each of the ``hops`` hops just pushed, as they are while no wake window
        is open (nothing silenced), all windows in one invocation; None when a window is open (its hops are
        analysed one by one), for a single hop, or with household heads (they need each hop's embedding)."""
        if hops < 2 or self.matcher.state != "idle" or self.adaptation is not None:
            return None
        return self.model.predict_batch(self.features.recent_windows(hops, self.hop_samples))

    def _invoke(self, t_audio: float, mono: float, wall: float, output: PipelineOutput,
                idle_posteriors: npt.NDArray[np.float32] | None) -> None:
        """``idle_posteriors``: this hop's posteriors if no wake window is open (``_idle_posteriors``); used
        when none is, or else the hop's window is analysed now (the block's earlier hops opened one)."""
        expected = self.matcher.expected_words()
        self._update_silence(listening=bool(expected))
        if idle_posteriors is not None and not expected:
            probabilities = idle_posteriors  # what predict() gives: the window with nothing silenced
        else:
            features = self.features.features(self._silence_before, end=self._samples)
            probabilities = self.model.predict(features)
        if self.adaptation is not None:
            recent = self.recent_hops
            mel = self.features.recent_mel(self._frames_per_hop, end=self._samples) \
                if recent.matching else None
            adapted = self.adaptation.apply(self.model.labels, probabilities, self.model.embedding(), recent,
                                            mel)
            index = self._verified_index
            if index >= 0 and adapted[index] > probabilities[index]:
                self._raised_at = t_audio
            probabilities = adapted
        self.invocations += 1
        scores = Scores(self.model.labels, probabilities, round(t_audio, 6))
        settled = bool(expected) and self._word_over()
        detection = self._verify(self.recognizer.process(scores, expected=expected, settled=settled), t_audio)
        if self.on_hop is not None:
            self.on_hop(scores, self.recognizer.judged, detection)
        if detection is None:
            return
        output.detections.append(detection)
        output.events.extend(self.matcher.on_detection(detection, wall_time=wall, mono_time=mono))
        if self.matcher.expected_words():  # a window is open (or still open): look for the pause after it
            self._pause_search_from = round(detection.end * SAMPLE_RATE) // self.model.params.hop_samples

    def _verify(self, detection: Detection | None, t_audio: float) -> Detection | None:
        """The detection, or None when it is the keyword model's wake word and the verifier rejects the
        last ``verifier.frames`` of audio (the recognizer counts it as fired: an utterance is judged once)."""
        verifier = self.verifier
        if verifier is None or detection is None or detection.word != verifier.word:
            return detection
        if self._raised_at is not None and t_audio - self._raised_at < self.settings.smoothing_seconds + 1e-6:
            return detection
        if verifier.accepts(self.features.recent_mel(verifier.frames, end=self._samples)):
            return detection
        self.rejected_wakes += 1
        return None

    def _update_silence(self, *, listening: bool) -> None:
        """While a wake window is open, move the start of what the model sees to the pause after the last
        word heard (see PAUSE_FRAMES); when it closes, the model sees its whole window again."""
        if not listening:
            self._pause_search_from = self._silence_before = None
            return
        if self._pause_search_from is None:
            return
        first, energies = self.features.recent_frame_energies(end=self._samples)
        frame = pause_start(first, energies, self._pause_search_from, PAUSE_FRAMES, PAUSE_DB)
        if frame is not None:
            self._silence_before = (frame + 1) * self.model.params.hop_samples
            self._pause_search_from = None

    def _word_over(self) -> bool:
        """The model hears only what followed the pause after the last word heard, and that has ended (see
        ``RecognizerSettings.settled_seconds``). False while no such pause was found: words said without one
        wait for the listening smoothing."""
        if self._silence_before is None or self._pause_search_from is not None:
            return False
        first, energies = self.features.recent_frame_energies(end=self._samples)
        since = self._silence_before // self.model.params.hop_samples - first
        return word_over(energies[max(0, since):], PAUSE_FRAMES, PAUSE_DB)

    def finish(self, *, mono_end: float | None = None, wall_end: float | None = None) -> PipelineOutput:
        """End of a finite stream: feed quiet padding so a word at the very end is still recognised."""
        padding = tail_padding()
        return self.feed(padding, mono_end=mono_end, wall_end=wall_end)


def load_pipeline(config: Config | None, model_path_override: Path | None = None) -> VoicePipeline:
    """The model named by the config (or the shipped one) and a pipeline for the config's voice settings,
    with the household adaptation in the config's state_dir, if any. Raises ModelError (bad or missing model)
    or ConfigError (words the model does not know)."""
    voice = config.voice if config is not None else VoiceSection()
    if model_path_override is not None:
        path = model_path_override
    elif config is not None:
        path = config.resolve_path(voice.model)
    else:
        from agent.paths import resolve_data_path

        path = resolve_data_path(voice.model)
    from agent.adaptation import has_adaptation, load_adaptation

    adaptation = None
    if config is not None and has_adaptation(config):  # the household's heads need the model's embedding
        model = KwsModel.load(path, embedding=True)
        try:
            adaptation = load_adaptation(config, model)
        except HomeAgentError as err:  # e.g. a new model whose bank was not rebuilt: listen, unadapted
            log.error("voice: the household adaptation is not used: %s", err)
    else:
        model = KwsModel.load(path)
    commands = commands_from_config(config) if config is not None else []
    return VoicePipeline(model, voice, commands, hop_seconds=model_hop_seconds(model), adaptation=adaptation)


def _listening_smoothing(model: KwsModel) -> float:
    """How much the words an open wake window expects are smoothed: metadata ``listening_smoothing_seconds``
    when the model states it, else LISTENING_SMOOTHING (never more than the model's own smoothing)."""
    value = model.metadata.get("listening_smoothing_seconds", LISTENING_SMOOTHING)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        value = LISTENING_SMOOTHING
    return min(float(value), model.smoothing_seconds)


# --------------------------------------------------------------------------------------------- the stage


class VoiceStage:
    """The voice worker thread: a stage (``start``/``stop``/``healthy``), built by ``agent.wiring``."""

    name = "voice"

    def __init__(
        self,
        *,
        config: Config,
        pipeline: VoicePipeline,
        source: AudioSource,
        publish: Publisher,
        request_action: Callable[[ActionRequest], int],
        is_muted: Callable[[], bool] = lambda: False,
        queued: Callable[[], int] = lambda: 0,
        wait_online: Callable[[float], bool] | None = None,
        on_end: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        arbiter: GroupArbiter | None = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.source = source
        self.topics = Topics.from_config(config)
        self._publish = publish
        self._request_action = request_action
        self._is_muted = is_muted
        self._queued = queued
        self._wait_online = wait_online
        self._on_end = on_end
        self._clock = clock
        self._arbiter = arbiter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._open = False
        self._finished = False
        self._beat = clock()
        self._last_expiry = 0.0
        self._retry_logged = False
        self._lock = threading.Lock()
        self._next_pipeline: VoicePipeline | None = None  # from a reload, swapped in by the voice thread
        self.capture: WakeCapture | None = None  # [voice] capture: agent.false_wake.attach_capture sets it
        self.counts = {"detections": 0, "intents": 0, "actions_requested": 0, "actions_refused": 0,
                       "audio_errors": 0, "open_failures": 0, "muted_chunks": 0, "samples": 0}

    # ----------------------------------------------------------------- Stage interface

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("voice stage already started")
        self._beat = self._clock()
        self._thread = threading.Thread(target=self._main, name="voice", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
            if thread.is_alive():
                log.warning("the voice thread did not stop within 5 s")
        self._close_source()
        log.info("voice stage stopped: %s", self.stats())

    def healthy(self, now: float) -> bool:
        thread = self._thread
        if thread is None:
            return True
        if not thread.is_alive():
            return self._finished  # a finite source that ended is fine; a dead thread is not
        return now - self._beat < HEARTBEAT_LIMIT

    @property
    def finished(self) -> bool:
        return self._finished

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self.counts)
        # dropped_samples: 0 for a source that cannot fall behind (a file); the diagnostics sensor shows it
        return {**counts, "dropped_samples": 0, **self.source.stats(),
                "invocations": self.pipeline.invocations, "rejected_wakes": self.pipeline.rejected_wakes}

    def reload_adaptation(self) -> None:
        """SIGHUP: pick up what ``home-agent enroll`` learned (or forgot) since the start. A failure keeps the
        running pipeline."""
        try:
            self._next_pipeline = load_pipeline(self.config)
        except HomeAgentError as err:
            log.error("voice: household adaptation not reloaded, keeping the running one: %s", err)
            return
        adaptation = self._next_pipeline.adaptation
        log.info("voice: household adaptation %s", "; ".join(adaptation.describe()) if adaptation else "none")

    # ----------------------------------------------------------------- the thread

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[name] += amount

    def _main(self) -> None:
        try:
            self._loop()
        except Exception:  # the thread dies; healthy() turns False and the supervisor reports it
            log.exception("the voice stage failed")
        finally:
            self._close_source()

    def _loop(self) -> None:
        retry_interval = self.config.audio.retry_interval
        if self.source.finite and self._wait_online is not None:
            self._await_broker(self._wait_online)
        while not self._stop.is_set():
            self._beat = self._clock()
            if self._next_pipeline is not None:
                self.pipeline, self._next_pipeline = self._next_pipeline, None
            if self._is_muted() and self.source.retry_on_error:
                self._close_source()  # a muted microphone is closed, not just ignored
                self._wait(READ_TIMEOUT)
                continue
            if not self._open and not self._try_open():
                if not self.source.retry_on_error:
                    self._end_of_stream(failed=True)
                    return
                self._wait(retry_interval)
                continue
            try:
                seconds = self.pipeline.read_seconds()
                chunk = self.source.read(READ_TIMEOUT + (seconds or 0.0), seconds=seconds)
            except EndOfAudio:
                self._end_of_stream(failed=False)
                return
            except AudioError as err:
                self._count("audio_errors")
                if not self.source.retry_on_error:
                    log.error("%s", err)
                    self._end_of_stream(failed=True)
                    return
                log.warning("%s; reopening in %.0f s", err, retry_interval)
                self._close_source()
                self._wait(retry_interval)
                continue
            if chunk is None:
                continue
            if self._is_muted():
                self._count("muted_chunks")
                self.pipeline.reset()  # nothing heard before the mute may complete a command after it
                continue
            self._count("samples", len(chunk.samples))
            wall = time.time() - (self._clock() - chunk.t_mono)
            output = self.pipeline.feed(chunk.samples, mono_end=chunk.t_mono, wall_end=wall)
            if self.capture is not None:
                self.capture.hear(chunk.samples, output, self.pipeline.t_audio)
            if self._arbiter is not None:
                self._arbiter.hear(chunk.samples, output.detections)
            self._handle(output)

    def _await_broker(self, wait_online: Callable[[float], bool]) -> None:
        limit = min(self.config.service.ready_grace, MAX_ONLINE_WAIT)
        deadline = self._clock() + limit
        while not self._stop.is_set():
            self._beat = self._clock()
            if wait_online(min(READ_TIMEOUT, max(0.0, deadline - self._beat))):
                self._wait(RETAINED_SETTLE)
                return
            if self._clock() >= deadline:
                log.warning("voice: the MQTT broker is not reachable after %.1f s; replaying %s anyway",
                            limit, self.source.description)
                return

    def _wait(self, seconds: float) -> None:
        """Sleep interruptibly, still beating (a long retry interval is not a hang)."""
        deadline = self._clock() + seconds
        while not self._stop.is_set():
            self._beat = self._clock()
            remaining = deadline - self._beat
            if remaining <= 0:
                return
            self._stop.wait(min(remaining, READ_TIMEOUT))

    def _try_open(self) -> bool:
        try:
            self.source.open()
        except AudioError as err:
            self._count("open_failures")
            if self.source.retry_on_error:
                # The first failure at WARNING with the reason; repeats quieter so the journal is not flooded.
                level = logging.DEBUG if self._retry_logged else logging.WARNING
                log.log(level, "%s; retrying every %.0f s", err, self.config.audio.retry_interval)
                self._retry_logged = True
            else:
                log.error("%s", err)
            return False
        if self._retry_logged:
            log.info("audio source is back: %s", self.source.description)
        self._retry_logged = False
        self._open = True
        self.pipeline.reset()  # a new stream: audio time restarts
        log.info("voice: listening to %s (model %s, hop %.0f ms)", self.source.description,
                 self.pipeline.model.path.name, self.pipeline.hop_seconds * 1000)
        return True

    def _close_source(self) -> None:
        if self._open:
            self._open = False
            self.source.close()

    def _end_of_stream(self, *, failed: bool) -> None:
        if not failed:
            now = self._clock()
            self._handle(self.pipeline.finish(mono_end=now, wall_end=time.time()))
            if self.capture is not None:
                self.capture.finish()
            log.info("voice: end of %s (%.1f s of audio)", self.source.description, self.pipeline.t_audio)
        self._close_source()
        self._finished = True
        if self._on_end is not None:
            self._drain()
            self._on_end()

    def _drain(self) -> None:
        """Exit-at-end: wait until everything queued was handed to the broker, or has expired."""
        deadline = max(self._last_expiry, self._clock()) + DRAIN_MARGIN
        while not self._stop.is_set() and self._clock() < deadline and self._queued() > 0:
            self._beat = self._clock()
            self._stop.wait(0.02)

    # ----------------------------------------------------------------- results

    def _handle(self, output: PipelineOutput) -> None:
        for detection in output.detections:
            self._count("detections")
            log.info("voice: heard %r (score %.2f) at %.2f s", detection.word, detection.score, detection.end)
        for event in output.events:
            if event.kind == "intent" and event.intent is not None:
                self._fire(event.intent)
            elif event.kind == "wake":
                log.debug("voice: wake word at %.2f s, listening for %.1f s", event.t_audio,
                          self.config.voice.wake_window)
            elif event.kind == "confirm_pending":
                log.info('voice: %s needs confirmation: say "yes" within %.0f s', event.action,
                         self.config.voice.confirm_window)
            elif event.kind in ("cancelled", "expired") and event.action is not None:
                log.info("voice: %s cancelled (%s)", event.action, event.reason)

    def _fire(self, intent: Intent) -> None:
        self._count("intents")
        section = self.config.actions[intent.action]
        request = ActionRequest(action=intent.action, source="voice", created_mono=intent.created_mono,
                                ttl=section.ttl)
        expires = request.expires_mono
        assert expires is not None  # a voice request always carries its action's ttl
        self._last_expiry = max(self._last_expiry, expires)
        log.info("voice: intent %s from %r at %.2f s", intent.action, " ".join(intent.words), intent.t_audio)
        if self._arbiter is not None:  # the group decides; if we win, the arbiter calls _act (another thread)
            self._arbiter.submit(intent, lambda: self._act(intent, request), expires=expires)
            return
        self._act(intent, request)

    def _act(self, intent: Intent, request: ActionRequest) -> None:
        topics = self.topics
        agent = self.config.agent.id
        messages = (
            (topics.intent, intent_payload(intent, agent)),
            (Topics.hermes_intent(intent.action), hermes_payload(intent, agent, self.config.voice.wake_word)),
            (topics.event, event_payload(intent, agent)),
        )
        for topic, payload in messages:
            self._publish(topic, encode(payload), qos=1, retain=False, expires_mono=request.expires_mono)
        try:
            self._request_action(request)
            self._count("actions_requested")
        except ActionError:
            self._count("actions_refused")  # the app logged why (rate limit, expired, muted)
