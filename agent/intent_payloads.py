"""The messages the voice stage publishes for an intent (``agent.voice.VoiceStage``): its JSON, Rhasspy's
Hermes intent and the Home Assistant event, built from the :class:`~agent.messages.Intent`, and how they
are encoded."""

from __future__ import annotations

import json
import uuid
from typing import Any

from agent.messages import Intent


def intent_payload(intent: Intent, agent: str) -> dict[str, Any]:
    """``agent``: the agent that acts on it (the one that won the arbitration, when there is one)."""
    return {"intent": intent.action, "words": list(intent.words),
            "scores": [round(s, 4) for s in intent.scores], "time": round(intent.time, 3), "agent": agent}


def hermes_payload(intent: Intent, site_id: str, wake_word: str) -> dict[str, Any]:
    """The ``hermes/intent/<name>`` message as Rhasspy 2.5 publishes it."""
    text = " ".join(intent.words)
    tokens = []
    position = 0
    for word, score in zip(intent.words, intent.scores, strict=True):
        tokens.append({"value": word, "confidence": round(score, 4), "rangeStart": position,
                       "rangeEnd": position + len(word)})
        position += len(word) + 1
    confidence = round(min(intent.scores), 4) if intent.scores else 1.0
    return {
        "input": text,
        "rawInput": text,
        "intent": {"intentName": intent.action, "confidenceScore": confidence},
        "siteId": site_id,
        "id": None,
        "slots": [],
        "sessionId": uuid.uuid4().hex,
        "customData": None,
        "asrTokens": [tokens],
        "asrConfidence": confidence,
        "wakewordId": wake_word,
        "lang": None,
    }


def event_payload(intent: Intent, agent: str) -> dict[str, Any]:
    """Home Assistant MQTT event entity: ``event_type`` plus attributes (``agent``: which agent acted)."""
    return {"event_type": intent.action, "words": list(intent.words),
            "scores": [round(s, 4) for s in intent.scores], "time": round(intent.time, 3), "agent": agent}


def encode(payload: dict[str, Any]) -> bytes:
    """Compact JSON, UTF-8."""
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")
