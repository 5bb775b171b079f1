"""home-agent: an offline voice-and-sensor agent for the smart home."""

__version__ = "0.1.0"
