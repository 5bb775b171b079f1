"""The project's own exception types; library errors are converted to these at the boundary."""

from __future__ import annotations


class HomeAgentError(Exception):
    """Base class of every error home-agent raises on purpose."""


class ConfigError(HomeAgentError):
    """The configuration file is missing, unreadable or invalid. The CLI exits with status 2."""


class AgentIdClashError(ConfigError):
    """Another live agent already runs with this agent id on the broker (exit status 2: a second agent must
    get its own ``[agent] id``, or the other one must stop)."""


class MqttError(HomeAgentError):
    """Broker connection or protocol failure."""


class MqttAuthError(MqttError):
    """The broker refused our credentials; retrying will not help."""


class PayloadError(HomeAgentError):
    """An incoming MQTT payload could not be used (counted as a bad payload, never fatal)."""


class ActionError(HomeAgentError):
    """An action could not be rendered or is not allowed."""


class ModelError(HomeAgentError):
    """A model file or its metadata is missing, corrupt or inconsistent."""


class AudioError(HomeAgentError):
    """An audio source failed: missing microphone, unreadable or malformed file."""


class StateError(HomeAgentError):
    """Persisted state (state files, outbox) could not be read or written."""
