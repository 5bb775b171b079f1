"""Command line: argument parsing only. Each subcommand hands over to the module that owns the job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from agent import __version__
from agent.errors import ConfigError, HomeAgentError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

Handler = Callable[[argparse.Namespace], int]


def _check_config(args: argparse.Namespace) -> int:
    from agent.config import load_config

    config = load_config(args.config)
    print(f"{args.config}: ok (agent {config.agent.id!r}, {len(config.telemetry)} telemetry streams, "
          f"{len(config.actions)} actions, {len(config.voice.commands)} voice commands)")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from agent.app import run_daemon

    return run_daemon(args)


def _action(args: argparse.Namespace) -> int:
    from agent.app import fire_action

    return fire_action(args)


def _devices(args: argparse.Namespace) -> int:
    from agent.audio import print_devices

    return print_devices(args)


def _transcribe(args: argparse.Namespace) -> int:
    from agent.transcribe import transcribe_main

    return transcribe_main(args)


def _enroll(args: argparse.Namespace) -> int:
    from agent.enroll import enroll_main

    return enroll_main(args)


def _anomaly_score(args: argparse.Namespace) -> int:
    from agent.anomaly_score import anomaly_score_main

    return anomaly_score_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="home-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"home-agent {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold (default INFO); logs go to stderr, journald picks them up")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("run", _run, "run the agent as a daemon")
    p.add_argument("--config", type=Path, default=Path("/etc/home-agent/config.toml"))
    p.add_argument("--audio", help='override [audio] source: "mic", "stdin" or "file:PATH"')
    p.add_argument("--exit-at-end", action="store_true",
                   help="with a file audio source: stop once the file has been processed")

    p = add("check-config", _check_config, "validate a config file and exit (status 2 when invalid)")
    p.add_argument("--config", type=Path, default=Path("/etc/home-agent/config.toml"))

    p = add("action", _action, "fire one configured action once and exit")
    p.add_argument("name", help="an [actions.*] name from the config")
    p.add_argument("--config", type=Path, default=Path("/etc/home-agent/config.toml"))
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the broker connection and acknowledgement (default 10)")

    p = add("devices", _devices, "list audio input devices")

    p = add("transcribe", _transcribe, "run the streaming voice path over audio files as fast as possible")
    p.add_argument("--config", type=Path, default=None, help="config for voice settings (optional)")
    p.add_argument("--json", action="store_true", help="one JSON line per file")
    p.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")

    p = add("enroll", _enroll, "adapt the voice model to a household: learn its voices, unlearn false wakes")
    p.add_argument("--config", type=Path, default=Path("/etc/home-agent/config.toml"))
    p.add_argument("--word", help="the model word the recordings say (the wake word or a command word)")
    p.add_argument("--record", type=int, metavar="N", help="record N takes of --word on the microphone")
    p.add_argument("--not-word", nargs="*", type=Path, metavar="FILE",
                   help="recordings that woke the agent by mistake: stop waking on them")
    p.add_argument("--list", action="store_true", help="show what was learned")
    p.add_argument("--reset", action="store_true", help="forget everything learned")
    p.add_argument("files", nargs="*", type=Path, metavar="FILE", help="WAV/FLAC, one utterance each")

    p = add("anomaly-score", _anomaly_score, "score timestamp,value CSV files strictly online")
    p.add_argument("--input", action="append", type=Path, required=True,
                   help="CSV file or folder (repeatable)")
    p.add_argument("--output", action="append", type=Path, required=True,
                   help="CSV file or folder (repeatable)")
    p.add_argument("--model", type=Path, default=None, help="anomaly model (default: the shipped one)")
    return parser


def configure_logging(level: str) -> None:
    from agent.sdnotify import JournalFormatter, stderr_is_journal

    handler = logging.StreamHandler(sys.stderr)
    # Under systemd the journal adds time stamps itself and takes the level from a "<N>" prefix.
    handler.setFormatter(JournalFormatter() if stderr_is_journal()
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as err:
        print(f"home-agent: configuration error:\n{err}", file=sys.stderr)
        return EXIT_CONFIG
    except HomeAgentError as err:
        print(f"home-agent: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
