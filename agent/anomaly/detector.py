"""One stream's detector: a reading in, the probability that it is anomalous and the alert decision out.

Strictly online: every reading is scored against what the stream did before it, then learnt. No model
file: simple statistics of the stream against its own history (``models/anomaly.md`` has the ablation that
retired the int8 forecaster).

Statistics (each a non-negative number per reading):

- ``spike``: the reading against the last one plus the recent trend (a daily cycle is no spike).
- ``step``, ``drift``: at ``SCALES`` time scales of k readings, a fast moving average (span k) against one
  ``ref_ratio`` times slower. The scales are in readings, so they follow the stream's own sampling rate.
- ``noise``: the recent size of changes against the usual size (louder or quieter).
- daily (kind ``drift``): the mean change over one day of the stream's readings (daily cycles cancel out).
- ``stuck``: the current run of identical values against that value's usual run (a light at 0 lux all
  night, a binary sensor's states are resting values; a move onto one is no change of level).
- shift (kind ``step``): a two-window test, the recent level (the average at 64 readings) against the mean
  of the stream's whole history (an expanding window up to ``shift_span`` readings, so a short stream's
  whole normal stretch counts), in units of the recent level's usual distance from that mean (which holds
  the stream's autocorrelation and daily cycle). Its p is Gaussian-like (``shift_gain`` x z^2 decades),
  made stricter by ``shift_looks`` x log10 of the looks the test has had (history / 64 readings): a
  false-alarm rate per unit of the stream's own history. Catches the sustained 1-5 sigma level shifts of
  SKAB's valve faults that the tail likelihood below learns away as the stream's new normal.
- ``dropout`` and out of range (kind ``spike`` or ``drift``) are probabilities of their own: the gap against
  the usual interval and the longest gap seen; the distance beyond the stream's range, loose while young. The
  range learns every reading until the stream is a day old (its daily cycle; a 1-minute stream's 300 learning
  readings are 5 hours), then widens at a limited rate.

Likelihood against the stream's own history (NAB's anomaly likelihood, with a heavier tail): each
statistic is divided by its own running mean; below ``tail_u`` times the mean an exponential body, above it
a Pareto tail whose index is estimated online (Hill) with a conservative prior while the history is short
(the running mean is an expanding average until ``tail_span`` readings are behind it).
The smallest tail probability times the number of statistics (Bonferroni) is the reading's p. Persistence:
a CUSUM of each reading's decades of evidence beyond ``evidence_allowance`` (a ramp, a slow step: moderate
evidence reading after reading) is a p of its own. The evidence is the posterior probability of an anomaly
with a prior rate ``prior_rate`` and a Bayes factor of 1/p: ``1 / (1 + (p / prior odds))``; the alert
thresholds apply to it. The published score is its calibration (``CALIBRATION``, a monotone map fitted on
labelled development data): a threshold on the score is a threshold on a probability.

Alerts (``_track``, the one place that decides whether a stream's alert is active): an alert starts when
the evidence reaches ``threshold`` after the learning period (``learning_period``: ``learning_readings``, a
third of them for a fast stream), outside the cooldown after the previous
episode (the configured cooldown, at most ``cooldown_readings`` of the stream's usual intervals: a 1-second
stream does not wait an hour), and not while an episode that began in the learning period lasts (a stream that
starts in an unusual state is not alerted when learning ends). The episode ends by itself after
``end_readings`` readings below ``clear_threshold``; after ``accept_readings`` the stream's new level is its
normal and is learnt afresh.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, NamedTuple, Protocol

from agent.config import AnomalySection
from agent.messages import AnomalyKind

SCALES: Final[tuple[int, ...]] = (1, 8, 64, 256)  # readings per fast average
# the kind of each statistic: one per scale, then noise, stuck; dropout is scored directly
KINDS: Final[tuple[AnomalyKind, ...]] = ("spike", "step", "drift", "drift", "noise", "drift", "stuck",
                                         "dropout", "step")
KIND_NOISE, KIND_DAILY, KIND_STUCK, KIND_DROPOUT, KIND_SHIFT = 4, 5, 6, 7, 8
SHIFT_SCALE = 2  # index in SCALES of the shift test's recent level
NOISE_SCALE = 16  # readings per fast average of |difference| (the noise statistic)
N_STATS = len(SCALES) + 3
DAY = 86400.0
LN10 = math.log(10.0)
# The calibration of the published score (``anomaly_score``), defined here only: (evidence, probability)
# points, the evidence in decades of the detector's posterior odds (at the prior rate ``prior_rate``: what
# alerts are decided on), the probability that a reading with that evidence lies inside a labelled
# anomaly window. Isotonic fit on the SKAB development rows (every row of the 27 development runs of session
# 19's split, refitted when that split moved three runs into development; base rate 26 %; 0.5-decade bins
# where the share rises, one point per narrow pooled block: ``fit_calibration`` in bench/anomaly_bench.py,
# which writes the fit it would make as ``skab.development.fitted_calibration`` in
# bench/results/anomaly.json); linear between the points, constant beyond the ends. It inherits SKAB's base
# rate: read it as "how often readings scored like this were anomalous on the development corpus", not as a
# home sensor's own rate.
CALIBRATION: Final[tuple[tuple[float, float], ...]] = (
    (-30.0, 0.0), (-1.61, 0.252), (-0.94, 0.253), (0.2, 0.272), (0.72, 0.302), (1.21, 0.423), (1.93, 0.501),
    (2.99, 0.513), (3.99, 0.534), (4.98, 0.567), (5.99, 0.583), (6.96, 0.586), (7.51, 0.592), (30.0, 0.592))
_CAL_X: Final = tuple(x for x, _ in CALIBRATION)
_CAL_Y: Final = tuple(y for _, y in CALIBRATION)


def calibrated(posterior: float) -> float:
    """The published score of a reading whose evidence (the posterior alerts are decided on) is ``posterior``:
    monotone, from ``CALIBRATION``."""
    if posterior <= 0.0:
        return _CAL_Y[0]
    if posterior >= 1.0:
        return _CAL_Y[-1]
    decades = math.log10(posterior / (1.0 - posterior))
    i = bisect.bisect_right(_CAL_X, decades)
    if i == 0:
        return _CAL_Y[0]
    if i == len(_CAL_X):
        return _CAL_Y[-1]
    x0, x1 = _CAL_X[i - 1], _CAL_X[i]
    return _CAL_Y[i - 1] + (_CAL_Y[i] - _CAL_Y[i - 1]) * (decades - x0) / (x1 - x0)


@dataclass(frozen=True, slots=True)
class Tuning:
    """Constants of the detector (tuned on the SKAB development runs and the home logs, see
    bench/anomaly_bench.py); one place, shared by the daemon, the CLI and the bench."""

    ref_ratio: float = 8.0  # reference average = this many times slower than the fast one
    noise_span: float = 30.0  # running means of |difference| and of |value - recent level|
    trend_span: float = 4.0  # the spike statistic's recent trend (readings)
    clip: float = 8.0  # readings are learnt clipped to the recent level +- clip x its usual distance
    interval_span: float = 50.0  # usual interval between readings (log domain)
    rate_change: float = 3.0  # the usual interval moved this many times away: the stream relearns
    tail_span: float = 1000.0  # each statistic's own running mean (readings)
    tail_memory: float = 20000.0  # readings of history behind each tail estimate
    tail_u: float = 3.0  # the tail starts at this many times the statistic's mean
    prior_p: float = 0.05  # prior exceedance rate of tail_u ...
    prior_n: float = 100.0  # ... worth this many readings
    # prior mean log-excess per statistic (spike, step, drift, noise, stuck; a heavy, forgiving tail) ...
    prior_h: tuple[float, ...] = (0.5, 0.2, 0.2, 0.2, 0.2, 0.2, 0.35)
    prior_k: float = 5.0  # ... worth this many exceedances
    prior_rate: float = 0.02  # prior probability that a reading is anomalous (score calibration)
    cooldown_readings: int = 60  # cooldown at most this many usual intervals
    end_readings: int = 3  # an episode ends after this many readings below clear_threshold
    dropout_factor: float = 10.0  # dropout probability 1 at this many usual intervals (at least) ...
    dropout_history: float = 3.0  # ... or at this many times the longest gap the stream had
    envelope_limit: float = 0.7  # out of the stream's range by this fraction of it: probability 1 ...
    envelope_young_days: float = 2.5  # ... times (1 + this / age in days): a young stream's range is loose
    envelope_growth: float = 0.1  # after learning, the range widens by at most this fraction per day ...
    envelope_learn_days: float = 1.0  # ... and it learns freely until the stream is this old (a day's cycle)
    accept_readings: int = 60  # an episode this long is the stream's new normal: it relearns its level
    run_span: float = 50.0  # usual run length of identical values (runs)
    stuck_table: int = 4  # values the stream rests on, tracked with their own usual run length
    shift_span: float = 2048.0  # the shift test's baseline: the mean of the stream's history, up to this span
    shift_gain: float = 0.27  # log10 of the shift test's p per squared usual distance ...
    shift_looks: float = 1.0  # ... plus this x log10 of its looks so far (readings of history / scale)
    shift_clip: float = 3.0  # a recent level beyond this many usual distances is learnt at it
    shift_warmup: int = 30  # readings of history before the shift test accumulates
    evidence_allowance: float = 3.0  # evidence (decades of the reading's p) a reading may bring unnoticed ...
    evidence_cap: float = 4.0  # ... and at most this much counts from one reading (a spike alerts alone)
    # A fast stream (its shift scale, SCALES[SHIFT_SCALE] usual intervals, spans less than this share of a
    # day: sampled faster than every 13.5 s) learns for this share of ``learning_readings`` (100 of 300)
    fast_day_share: float = 0.01
    fast_learning_share: float = 1.0 / 3.0


TUNING = Tuning()


def capped_cooldown(cooldown: float, readings: int, log_interval: float) -> float:
    """``cooldown``, at most ``readings`` usual intervals (``log_interval``: their log; NaN until known) of a
    stream or a device group, so a slow one is not kept quiet for many readings."""
    if math.isnan(log_interval):
        return cooldown
    return min(cooldown, readings * math.exp(log_interval))


def learning_period(configured: int, interval: float, tuning: Tuning) -> int:
    """Readings (ticks for a device group) before a stream may alert, for a stream whose usual interval is
    ``interval`` seconds (not positive or NaN: not known yet): the configured ``learning_readings``, or for
    a fast stream ``fast_learning_share`` of it. A slow stream's statistics span hours: its learning period
    must also see its daily cycle (home logs: shorter ones alert on a young stream's first evening and
    night). A fast stream's scales see nothing of a day; it needs only the readings that learn its
    statistics, and a short run's fault may come early (SKAB's runs are 700-1,300 readings; NAB scores
    from 15 % of a stream)."""
    if not interval > 0.0 or SCALES[SHIFT_SCALE] * interval >= tuning.fast_day_share * DAY:
        return configured
    return max(10, round(configured * tuning.fast_learning_share))


EPISODE_STARTED, EPISODE_ENDED = "started", "ended"


class Episode(Protocol):
    """What :func:`episode_step` keeps of a stream's or a device group's alert episode."""

    active: bool
    armed: bool
    quiet: int
    episode_end: float


def episode_step(ep: Episode, t: float, evidence: float, cfg: AnomalySection, *, learnt: bool,
                 cooldown: Callable[[], float], end_readings: int) -> str | None:
    """One reading's (or tick's) step of an alert episode, shared by streams and device groups: an alert
    starts at ``cfg.threshold`` once learnt, re-armed by a reading below ``cfg.clear_threshold`` and past
    the cooldown; it ends after ``end_readings`` quiet readings. EPISODE_STARTED, EPISODE_ENDED or None."""
    if ep.active:
        ep.quiet = ep.quiet + 1 if evidence < cfg.clear_threshold else 0
        if ep.quiet >= end_readings:
            ep.active, ep.quiet, ep.episode_end = False, 0, t
            return EPISODE_ENDED
        return None
    if evidence < cfg.clear_threshold:
        ep.armed = True
    elif not learnt:
        ep.armed = False  # a stream that starts in an unusual state is not alerted when learning ends
    if evidence >= cfg.threshold and learnt and ep.armed and t - ep.episode_end >= cooldown():
        ep.active, ep.quiet = True, 0
        return EPISODE_STARTED
    return None


@dataclass(slots=True)
class StreamState:
    """Everything one stream's detector knows: plain numbers and short lists (about 1 KB as JSON)."""

    n: int = 0  # readings learnt since the stream (re)started learning
    first_time: float = math.nan  # the stream's first reading (its age sets how loose its range is)
    low: float = math.inf  # the stream's range, widening at a limited rate after learning
    high: float = -math.inf
    last_time: float = math.nan
    last_value: float = math.nan
    log_interval: float = math.nan  # running log of the usual interval (seconds)
    interval_bound: float = 0.0  # the usual interval (exp(log_interval)): no dropout up to it
    learnt_log_interval: float = math.nan  # the usual interval the statistics were learnt at
    max_gap: float = 1.0  # longest gap seen, in usual intervals (decays slowly)
    noise: float = 0.0  # running mean of |difference| (0: the stream never moved)
    trend: float = 0.0  # recent mean difference (clipped like the level)
    spread: float = 0.0  # running mean of |value - recent level| (clips outliers before they are learnt)
    noise_fast: float = 0.0  # fast and reference averages of |difference| (the noise statistic)
    noise_ref: float = 0.0
    slope: float = 0.0  # mean change per reading over about a day, in noise units (daily cycles cancel)
    base: float = math.nan  # the shift test: mean of the stream's history (expanding, capped) ...
    base_var: float = 0.0  # ... and the usual squared distance of the recent level from it
    base_n: int = 0  # readings behind the baseline
    evidence: float = 0.0  # accumulated evidence of recent readings (a CUSUM of decades beyond the allowance)
    fast: list[float] = field(default_factory=list)  # per scale: fast average
    ref: list[float] = field(default_factory=list)  # per scale: reference average
    tails: list[list[float]] = field(default_factory=lambda: [[0.0, 0.0, 0.0, 0.0] for _ in range(N_STATS)])
    run_value: float = math.nan
    run_length: int = 0
    run_mean: float = 1.0  # usual run length of identical values (values outside the table)
    resting: list[list[float]] = field(default_factory=list)  # [value, usual run length, weight]
    # the episode tracker
    score: float = 0.0  # the last published (calibrated) score
    kind: int = 0
    active: bool = False
    quiet: int = 0  # readings below clear_threshold in a row while active
    length: int = 0  # readings in the current episode
    episode_end: float = -math.inf
    armed: bool = True  # False while an episode that began in the learning period lasts (it is not alerted)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = None  # JSON has no NaN or infinity
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamState:
        """The inverse of ``to_dict``; raises ValueError/TypeError on a malformed entry."""
        defaults = cls()
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value, default = data[f.name], getattr(defaults, f.name)
            if isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, int):
                value = int(value)
            elif isinstance(default, float):
                value = -math.inf if value is None and f.name == "episode_end" else (
                    math.nan if value is None else float(value))
            elif not isinstance(value, list):
                raise ValueError(f"{f.name}: expected a list")
            else:
                value = [[float(v) for v in item] if isinstance(item, list) else float(item)
                         for item in value]
            kwargs[f.name] = value
        state = cls(**kwargs)
        if len(state.tails) != N_STATS or any(len(t) != 4 for t in state.tails):
            raise ValueError(f"tails: expected {N_STATS} x 4 numbers")
        if len(state.fast) not in (0, len(SCALES)) or len(state.ref) != len(state.fast):
            raise ValueError(f"fast/ref: expected {len(SCALES)} numbers each")
        if any(len(entry) != 3 for entry in state.resting):
            raise ValueError("resting: expected [value, run length, weight] entries")
        return state


class Outcome(NamedTuple):
    """What one reading did: its published score (calibrated) and kind, whether it started or ended an alert,
    and the detector's posterior that alerts are decided on (a tuple: one is made per reading)."""

    score: float
    kind: AnomalyKind
    started: bool = False
    ended: bool = False
    evidence: float = 0.0


def _weight(span: float) -> float:
    return 2.0 / (span + 1.0)


class StreamDetector:
    """One stream: ``update(time, value)`` scores a reading, then learns it. Not thread-safe (one owner).

    Readings that cannot be learnt (a non-finite value or time, a time not after the previous reading) are
    refused by ``update`` with a reason (counted in ``rejected``); they change nothing.
    """

    def __init__(self, config: AnomalySection, state: StreamState | None = None,
                 tuning: Tuning = TUNING) -> None:
        self.config = config
        self.tuning = tuning
        self.state = state if state is not None else StreamState()
        self.rejected: dict[str, int] = {}
        self.last_rejection = ""  # the reason of the latest refusal
        tu = tuning
        self._a_fast = [_weight(k) for k in SCALES]
        self._a_ref = [_weight(tu.ref_ratio * k) for k in SCALES]
        self._a_noise = _weight(tu.noise_span)
        self._a_trend = _weight(tu.trend_span)
        self._a_iv = _weight(tu.interval_span)
        self._a_tail = _weight(tu.tail_span)
        self._a_run = _weight(tu.run_span)
        self._a_base = 1.0 / tu.shift_span
        self._keep = 1.0 - 1.0 / tu.tail_memory
        self._u = tu.tail_u
        self._log_u = math.log(tu.tail_u)
        self._prior_n = tu.prior_n
        self._prior_k = tu.prior_k
        self._log_rate_change = math.log(tu.rate_change)
        self._prior_exc = tu.prior_p * tu.prior_n
        self._prior_hk = [h * tu.prior_k for h in tu.prior_h]
        self._a_nfast = _weight(NOISE_SCALE)
        self._a_nref = _weight(tu.ref_ratio * NOISE_SCALE)
        self._log_bonferroni = math.log10(N_STATS)
        self._log_prior = math.log10(tu.prior_rate / (1.0 - tu.prior_rate))
        self.learning = config.learning_readings
        # the latest reading's evidence from its statistics: -log10 of its p (Bonferroni, with persistence;
        # not the dropout and range probabilities, which a device's streams share); a device group combines
        # its members' (agent/anomaly/group.py)
        self.decades = 0.0

    # ---- calibration

    def probability(self, log10_p: float) -> float:
        """Posterior probability of an anomaly from log10 of the reading's (Bonferroni) tail probability."""
        exponent = log10_p - self._log_prior  # log10 of (1 - P) / P
        if exponent > 300.0:
            return 0.0
        return 1.0 / (1.0 + math.pow(10.0, exponent))

    def _tail_log10(self, stat: int, value: float) -> float:
        """log10 of the probability of a statistic at least ``value`` against its own history (0: none)."""
        tail = self.state.tails[stat]
        mean = tail[0]
        if mean <= 0.0 or value <= 0.0:
            return 0.0 if value <= 0.0 or tail[1] < 2.0 else -300.0
        q = value / mean
        log_pu = math.log10((tail[2] + self._prior_exc) / (tail[1] + self._prior_n))
        if q <= self._u:
            return q / self._u * log_pu
        h = (tail[3] + self._prior_hk[stat]) / (tail[2] + self._prior_k)
        result = log_pu - (math.log(q) - self._log_u) / (h * LN10)
        return result if result > -300.0 else -300.0

    def _tail_learn(self, tail: list[float], value: float) -> None:
        mean = tail[0]
        if mean <= 0.0:
            if value > 0.0:
                tail[0] = value
            tail[1] += 1.0
            return
        q = value / mean
        # an expanding mean while the history is shorter than tail_span: an exponential mean started at the
        # first (small) value lags for ~tail_span readings, and every reading meanwhile counted as a tail
        # exceedance taught a young stream that huge values are usual
        a = 1.0 / (tail[1] + 1.0)
        a = a if a > self._a_tail else self._a_tail
        tail[0] = mean + a * ((value if q < 10.0 else 10.0 * mean) - mean)
        keep = self._keep
        tail[1] = tail[1] * keep + 1.0
        if q > self._u:
            tail[2] = tail[2] * keep + 1.0
            tail[3] = tail[3] * keep + (math.log(q) - self._log_u)
        else:
            tail[2] *= keep
            tail[3] *= keep

    # ---- one reading

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.last_rejection = reason

    def update(self, t: float, x: float) -> Outcome | None:  # noqa: C901 - the scoring kernel (issue 17 item 4)
        """Score the reading at UNIX time ``t`` with value ``x``, then learn it. None when refused
        (counted in ``rejected``: "invalid", "duplicate_time", "time_backwards")."""
        s = self.state
        if not (math.isfinite(t) and math.isfinite(x)):
            self.reject("invalid")
            return None
        if not math.isnan(s.last_time):  # the stream had a reading
            if t == s.last_time:
                self.reject("duplicate_time")
                return None
            if t < s.last_time:
                self.reject("time_backwards")
                return None
        tu = self.tuning
        if not s.fast:
            s.fast = [x] * len(SCALES)
            s.ref = [x] * len(SCALES)
            s.last_time, s.last_value, s.run_value, s.run_length = t, x, x, 1
            s.first_time, s.low, s.high = t, x, x
            s.n = 1
            return self._track(t, 0.0, 0)
        gap = t - s.last_time
        log_iv = s.log_interval
        # dropout: the time since the previous reading against the usual interval
        log10_p = 0.0
        kind = 0
        dropout = 0.0
        if not math.isnan(log_iv) and gap > s.interval_bound:
            dropout = self.dropout_probability(gap)
        # level statistics at each scale, against the reference before this reading
        last = s.last_value
        noise = s.noise
        level = s.ref[0]
        # what is learnt of an outlier: clipped to the recent level +- clip x the usual distance from it
        # (which grows geometrically while readings stay away: a new level is learnt within ~60 readings)
        distance = abs(x - level)
        spread = s.spread
        c = tu.clip * spread
        xc = x if c <= 0.0 or distance <= c else (level + c if x > level else level - c)
        if distance > 0.0:
            capped = distance if spread <= 0.0 or distance < 8.0 * spread else 8.0 * spread
            s.spread = spread + self._a_noise * (capped - spread)
        fast, ref, tails = s.fast, s.ref, s.tails
        stats = [0.0] * N_STATS
        # a move onto a value the stream habitually rests on (off, 0 lux, a binary state) is no change of
        # level: only the stuck and dropout statistics speak for it
        at_rest = False
        for candidate in s.resting:
            if candidate[0] == x:
                at_rest = True
                break
        for k in range(0 if not at_rest else len(SCALES), len(SCALES)):
            if k == 0:  # against the last reading plus the recent trend (a daily cycle is no spike)
                stat = abs(x - last - s.trend)
            else:
                moved = fast[k] + self._a_fast[k] * (x - fast[k])
                stat = abs(moved - ref[k])
            stats[k] = stat
            lp = self._tail_log10(k, stat)
            if lp < log10_p:
                log10_p, kind = lp, k
        # noise: the recent size of changes against the usual size (both ways: louder or quieter)
        size = abs(x - last)
        capped = size if noise <= 0.0 or size < 8.0 * noise else 8.0 * noise
        noise_fast = s.noise_fast + self._a_nfast * (capped - s.noise_fast)
        if noise_fast > 0.0 and s.noise_ref > 0.0 and not at_rest:
            stats[KIND_NOISE] = abs(math.log(noise_fast / s.noise_ref))
            lp = self._tail_log10(KIND_NOISE, stats[KIND_NOISE])
            if lp < log10_p:
                log10_p, kind = lp, KIND_NOISE
        # daily: the mean change over about a day (a day of the stream's own readings): a daily cycle
        # cancels out, a drift does not
        slope = s.slope
        if noise > 0.0 and not math.isnan(log_iv) and not at_rest:
            step = (x - last) / noise
            step = step if -tu.clip <= step <= tu.clip else (tu.clip if step > 0.0 else -tu.clip)
            slope += 2.0 / (DAY / s.interval_bound + 1.0) * (step - slope)
            stats[KIND_DAILY] = abs(slope)
            lp = self._tail_log10(KIND_DAILY, stats[KIND_DAILY])
            if lp < log10_p:
                log10_p, kind = lp, KIND_DAILY
        # stuck: the current run of identical values against that value's usual run
        entry = None
        for candidate in s.resting:
            if candidate[0] == s.run_value:
                entry = candidate
                break
        if x == s.run_value:
            usual = entry[1] if entry is not None else s.run_mean
            stats[KIND_STUCK] = (s.run_length + 1) / usual
            lp = self._tail_log10(KIND_STUCK, stats[KIND_STUCK])
            if lp < log10_p:
                log10_p, kind = lp, KIND_STUCK
        # shift: the recent level (fast average at SHIFT_SCALE) against the mean of the stream's history, in
        # units of its usual distance from it (a two-window test; autocorrelation is in that usual distance)
        shift_z = 0.0
        if s.base_n > tu.shift_warmup and s.base_var > 0.0 and not at_rest:
            moved = fast[SHIFT_SCALE] + self._a_fast[SHIFT_SCALE] * (xc - fast[SHIFT_SCALE])
            shift_z = abs(moved - s.base) / math.sqrt(s.base_var)
            # a false-alarm rate per unit of the stream's own history: the longer the history, the more
            # independent looks (one per SHIFT_SCALE readings) the test has had, the more evidence it needs
            looks = s.base_n / SCALES[SHIFT_SCALE]
            lp = -tu.shift_gain * shift_z * shift_z
            if looks > 1.0:
                lp += tu.shift_looks * math.log10(looks)
            if lp < log10_p:
                log10_p, kind = lp, KIND_SHIFT
        # persistence: moderate evidence reading after reading (a ramp, a slow step) adds up; a CUSUM of the
        # decades of each reading's p beyond the allowance
        decades = -(log10_p + self._log_bonferroni)
        decades = decades if decades < tu.evidence_cap else tu.evidence_cap
        evidence = s.evidence + decades - tu.evidence_allowance
        s.evidence = evidence if evidence > 0.0 else 0.0
        if -s.evidence < log10_p + self._log_bonferroni:
            log10_p = -s.evidence - self._log_bonferroni
        self.decades = -(log10_p + self._log_bonferroni)
        score = self.probability(log10_p + self._log_bonferroni)
        if dropout > score:
            score, kind = dropout, KIND_DROPOUT
        envelope = self._envelope(t, x, gap)
        if envelope > score:
            # out of range in one jump: a spike (or the start of a step); else a drift
            score, kind = envelope, 0 if abs(x - last) >= min(abs(x - s.high), abs(s.low - x)) else 2
        # learn
        for k in range(len(SCALES)):
            fast[k] += self._a_fast[k] * (xc - fast[k])
            ref[k] += self._a_ref[k] * (xc - ref[k])
        if not s.active and not at_rest:
            for k in range(KIND_STUCK):
                self._tail_learn(tails[k], stats[k])
        if not s.active:
            self._learn_base(xc, fast[SHIFT_SCALE], shift_z)
        s.slope = slope
        diff = x - last
        bound = tu.clip * noise
        clipped_diff = diff if noise <= 0.0 or -bound <= diff <= bound else (bound if diff > 0.0 else -bound)
        s.trend += self._a_trend * (clipped_diff - s.trend)
        if size > 0.0 or not at_rest:  # a night resting at 0 lux does not make the morning's changes loud
            s.noise_fast = noise_fast
            s.noise_ref += self._a_nref * (noise_fast - s.noise_ref)
        if size > 0.0:  # the noise measures real changes: a sensor resting on 0 keeps its scale
            s.noise = size if noise <= 0.0 else noise + self._a_noise * (capped - noise)
        self._learn_interval(gap, score)
        self._learn_run(x, entry)
        s.last_time, s.last_value = t, x
        s.n += 1
        return self._track(t, score, kind)

    def _learn_base(self, x: float, level: float, z: float) -> None:
        """The shift test's baseline: the running mean of the stream's history (an expanding window while
        the history is shorter than ``shift_span``, so a short stream's whole normal stretch counts) and the
        usual squared distance of the recent level from it (a move far beyond it is learnt clipped)."""
        s, tu = self.state, self.tuning
        s.base_n += 1
        if s.base_n == 1 or math.isnan(s.base):
            s.base, s.base_var = x, 0.0
            return
        a = max(1.0 / s.base_n, self._a_base)
        s.base += a * (x - s.base)
        d = abs(level - s.base)
        if z > tu.shift_clip:
            d2 = tu.shift_clip * tu.shift_clip * s.base_var
        else:  # (squares of absurd values, 1e200, saturate instead of overflowing)
            d2 = d * d if d < 1e150 else 1e300
        s.base_var += a * (d2 - s.base_var)

    def _envelope(self, t: float, x: float, gap: float) -> float:
        """How far out of the stream's range ``x`` is (1: enough to alert on its own); learns the range."""
        s, tu = self.state, self.tuning
        low, high = s.low, s.high
        outside = x - high if x > high else (low - x if x < low else 0.0)
        if outside == 0.0:
            return 0.0
        age = t - s.first_time
        value = 0.0
        if high > low and age > 0.0:
            value = min(1.0, outside / (high - low) / (tu.envelope_limit * (1.0 + tu.envelope_young_days * DAY
                                                                              / age)))
        if s.n < self.learning or high <= low or age < tu.envelope_learn_days * DAY:
            s.low, s.high = min(low, x), max(high, x)
        else:
            widen = (high - low) * tu.envelope_growth * gap / DAY
            s.low = max(x, low - widen) if x < low else low
            s.high = min(x, high + widen) if x > high else high
        return value

    def _learn_interval(self, gap: float, score: float) -> None:
        s = self.state
        if math.isnan(s.log_interval):
            s.log_interval = s.learnt_log_interval = math.log(gap)
            s.interval_bound = gap
            return
        usual = math.exp(s.log_interval)
        ratio = gap / usual
        lo, hi = 0.25 * usual, 4.0 * usual
        clipped = gap if lo <= gap <= hi else (lo if gap < lo else hi)
        s.log_interval += self._a_iv * (math.log(clipped) - s.log_interval)
        s.interval_bound = math.exp(s.log_interval)
        if ratio > s.max_gap and score < self.config.threshold:
            s.max_gap = ratio
        s.max_gap = 1.0 + (s.max_gap - 1.0) * self._keep
        if abs(s.log_interval - s.learnt_log_interval) > self._log_rate_change:
            # the sampling rate changed: the per-reading statistics mean something else now; relearn them
            self.reject("rate_change")
            s.log_interval = s.learnt_log_interval = math.log(gap)
            s.interval_bound = gap
            s.n = 1
            s.max_gap = 1.0
            s.base_n = 0
            s.tails = [[0.0, 0.0, 0.0, 0.0] for _ in range(N_STATS)]

    def _learn_run(self, x: float, entry: list[float] | None) -> None:
        s = self.state
        if x == s.run_value:
            s.run_length += 1
            return
        length = s.run_length
        if length > 0 and not math.isnan(s.run_value):
            usual = entry[1] if entry is not None else s.run_mean
            self._tail_learn(s.tails[KIND_STUCK], length / usual)
            if entry is not None:
                entry[1] += self._a_run * (length - entry[1])
                entry[2] += length
            elif length >= 10 and length >= 3.0 * s.run_mean:
                self._rest_on(s.run_value, length)
            else:
                s.run_mean += self._a_run * (min(length, 10.0 * s.run_mean) - s.run_mean)
            for candidate in s.resting:
                candidate[2] *= self._keep
        s.run_value, s.run_length = x, 1

    def _rest_on(self, value: float, length: int) -> None:
        """Track a value the stream sat on for a notably long run, with its own usual run length."""
        resting = self.state.resting
        entry = [value, float(length), float(length)]
        if len(resting) < self.tuning.stuck_table:
            resting.append(entry)
            return
        weakest = min(range(len(resting)), key=lambda k: resting[k][2])
        if resting[weakest][2] < entry[2]:
            resting[weakest] = entry

    def dropout_probability(self, gap: float) -> float:
        """0 up to one usual interval; 1 at max(dropout_factor, dropout_history x longest gap) intervals."""
        s, tu = self.state, self.tuning
        if math.isnan(s.log_interval):
            return 0.0
        ratio = gap / math.exp(s.log_interval)
        if ratio <= 1.0:
            return 0.0
        limit = max(tu.dropout_factor, tu.dropout_history * s.max_gap)
        return min(1.0, math.log(ratio) / math.log(limit))

    # ---- episodes

    def learning_period(self) -> int:
        """Readings before this stream may alert (``learning_period``: fewer for a fast stream)."""
        return learning_period(self.learning, self.state.interval_bound, self.tuning)

    def cooldown(self) -> float:
        """The configured cooldown, at most ``cooldown_readings`` of the stream's usual intervals."""
        return capped_cooldown(self.config.cooldown, self.tuning.cooldown_readings, self.state.log_interval)

    def _track(self, t: float, evidence: float, kind: int) -> Outcome:
        """The episode tracker: one alert per episode, episodes end by themselves. ``evidence`` is the
        reading's posterior (the thresholds apply to it); the outcome's score is its calibration."""
        s = self.state
        score = calibrated(evidence)
        s.score, s.kind = score, kind
        if s.active:
            s.length += 1
            if s.length == self.tuning.accept_readings:
                # the stream stayed away this long: a new normal; learn its level from here
                s.fast = [s.last_value] * len(SCALES)
                s.ref = list(s.fast)
                s.slope = 0.0
                s.base_n = 0
                s.low, s.high = min(s.low, s.last_value), max(s.high, s.last_value)
        # (a stream past the configured period has learnt whatever its rate: no call per reading)
        learnt = s.n > self.learning or s.n > self.learning_period()
        step = episode_step(s, t, evidence, self.config, learnt=learnt,
                            cooldown=self.cooldown, end_readings=self.tuning.end_readings)
        if step is EPISODE_STARTED:
            s.length = 0
        return Outcome(score, KINDS[kind], started=step is EPISODE_STARTED, ended=step is EPISODE_ENDED,
                       evidence=evidence)

    def silence(self, now: float) -> Outcome | None:
        """The daemon's check of a silent stream: an alert once the dropout probability reaches the
        threshold (the next reading scores normally again and lets the episode end)."""
        s = self.state
        if s.active or s.n <= self.learning_period() or math.isnan(s.last_time):
            return None
        value = self.dropout_probability(now - s.last_time)
        if value < self.config.threshold or now - s.episode_end < self.cooldown():
            return None
        s.active, s.quiet, s.length, s.score, s.kind = True, 0, 0, calibrated(value), KIND_DROPOUT
        return Outcome(s.score, "dropout", started=True, evidence=value)

