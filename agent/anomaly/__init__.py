"""Sensor anomaly detection, strictly online, per stream and per device (groups of streams).

- ``detector``: one stream's statistics, calibrated score and alert episodes (shared by the daemon and
  ``home-agent anomaly-score``).
- ``group``: device groups: a device's streams combined per tick, one alert for the device naming them.
- ``streams``: every stream of the daemon, throttled events, device alerts, saved state.
- ``stage``: the daemon's worker thread.
"""

from agent.anomaly.detector import KINDS, Outcome, StreamDetector, StreamState, Tuning
from agent.anomaly.stage import AnomalyStage, build_stage
from agent.anomaly.streams import STATE_FILE_NAME, AnomalyDetector, Publication

__all__ = ["KINDS", "STATE_FILE_NAME", "AnomalyDetector", "AnomalyStage", "Outcome", "Publication",
           "StreamDetector", "StreamState", "Tuning", "build_stage"]
