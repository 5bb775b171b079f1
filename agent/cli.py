"""Command line: argument parsing only. Each subcommand hands over to the module that owns the job."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
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
    from agent.validate import load_checked

    config = load_checked(args.config)  # the same checks as `run` and a reload
    print(f"{args.config}: ok (agent {config.agent.id!r}, {len(config.telemetry)} telemetry streams, "
          f"{len(config.actions)} actions, {len(config.voice.commands)} voice commands)")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from agent.wiring import run_daemon

    return run_daemon(args)


def _action(args: argparse.Namespace) -> int:
    from agent.fire import fire_action

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
    from agent.anomaly_score import anomaly_score_main, pair_paths

    status = anomaly_score_main(args)
    if args.plot is not None and status == EXIT_OK:
        from agent.plots import write_sensor_plots

        write_sensor_plots(pair_paths(list(args.input), list(args.output)), args.plot, args.labels)
    return status


def _plot_path(text: str) -> Path:
    from agent.plots import plot_path  # numpy and the rest only when --plot is given

    return plot_path(text)


DEFAULT_CONFIG = Path("/etc/home-agent/config.toml")
CONFIG_HELP = "the agent's configuration file (default: %(default)s)"

DESCRIPTION = """\
home-agent: an offline voice-and-sensor agent for the smart home. It hears spoken commands ("computer,
heat up"), watches sensor telemetry on MQTT, and turns both into device commands that Home Assistant sees."""

EXAMPLES = {
    "run": """\
examples:
  home-agent run --config /etc/home-agent/config.toml        the daemon (what the systemd unit runs)
  home-agent run --config config.toml --audio file:command.wav --exit-at-end   replay a recording
  arecord -r 16000 -f S16_LE -c 1 | home-agent run --config config.toml --audio stdin
SIGTERM stops it, SIGHUP re-reads the config. Exit status 2: a configuration error (the key is named).""",
    "check-config": """\
example:
  home-agent check-config --config /etc/home-agent/config.toml
Prints "ok" and a summary, or names the bad key and exits with status 2.""",
    "action": """\
example:
  home-agent action heating_up --config config.toml   publish the [actions.heating_up] command once""",
    "devices": """\
example:
  home-agent devices
Put an index or part of a device name into [audio] device, e.g. device = "USB".""",
    "transcribe": """\
examples:
  home-agent transcribe examples/computer_heat_up.wav
  home-agent transcribe --json --config config.toml recordings/   one JSON line per file, with intents
WAV/FLAC files of any sample rate; the daemon's exact streaming path, as fast as the CPU allows.""",
    "enroll": """\
examples:
  home-agent enroll --config config.toml --word computer me1.wav me2.wav me3.wav me4.wav me5.wav
  home-agent enroll --config config.toml --record 5 --word computer   on the microphone
  home-agent enroll --config config.toml --not-word tv_clip.wav       stop waking on this sound
  home-agent enroll --config config.toml --list                       (--reset forgets it all)
Needs no broker; a running daemon picks the adaptation up on reload (SIGHUP).""",
    "anomaly-score": """\
example:
  home-agent anomaly-score --input readings.csv --output scored.csv
Input: a timestamp,value CSV per stream; output: timestamp,value,anomaly_score,alert (score in [0, 1];
alert=1 where the daemon would raise a new alert). Repeat --input/--output for several files, or give a
folder for each. Exit status 2, naming the file and line: an empty file, a header without 'timestamp' and
'value' columns (or a separator other than the comma), a header without rows, an --output that is an
--input. Counted warnings (the row is not learnt; alert 0): an unreadable timestamp or value, a time going
backwards or repeated.
Device group: --group scores every input as one device's streams (e.g. one zigbee2mqtt device's fields):
  home-agent anomaly-score --group --input pump/ --output scored/""",
}

SUMMARIES = {
    "run": "run the agent: MQTT, telemetry, voice, anomaly detection",
    "check-config": "validate a config file and exit (status 2 when invalid)",
    "action": "fire one configured action once and exit (to test a device)",
    "devices": "list the audio input devices (microphones)",
    "transcribe": "print the words and intents heard in audio files",
    "enroll": "adapt the voice model to a household: learn its voices, unlearn false wakes",
    "anomaly-score": "score timestamp,value CSV files with the anomaly detector, strictly online",
}


def _epilog() -> str:
    """The top-level help's examples: the first example line of each subcommand."""
    lines = ["commands, one example each (home-agent COMMAND --help for more):"]
    for name, text in EXAMPLES.items():
        example = next(line.strip() for line in text.splitlines() if "home-agent " + name in line)
        lines.append(f"  {example}")
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their layout; option help never breaks a path at its hyphen ("/etc/home-" "agent")."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(prog="home-agent", description=DESCRIPTION, epilog=_epilog(),
                                     formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"home-agent {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold (default INFO); logs go to stderr, journald picks them up")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=SUMMARIES[name], description=SUMMARIES[name], epilog=EXAMPLES[name],
                           formatter_class=formatter)
        p.set_defaults(handler=handler)
        return p

    p = add("run", _run)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--audio", metavar="SOURCE",
                   help='override [audio] source: "mic", "stdin" (raw 16 kHz S16_LE mono PCM) or "file:PATH"')
    p.add_argument("--exit-at-end", action="store_true",
                   help="with a file or stdin audio source: stop once the audio has ended")

    p = add("check-config", _check_config)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=CONFIG_HELP)

    p = add("action", _action)
    p.add_argument("name", help="an [actions.*] name from the config")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the broker connection and acknowledgement (default 10)")

    add("devices", _devices)

    p = add("transcribe", _transcribe)
    p.add_argument("--config", type=Path, default=None,
                   help="a config: use its [voice] settings and also report the intents (default: none)")
    p.add_argument("--json", action="store_true", help="one JSON line per file")
    p.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    p.add_argument("--plot", type=_plot_path, default=None, metavar="OUT.png",
                   help="draw the waveform, every word's score over time and what was heard (one file)")

    p = add("enroll", _enroll)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--word", help="the model word the recordings say (the wake word or a command word)")
    p.add_argument("--record", type=int, metavar="N", help="record N takes of --word on the microphone")
    p.add_argument("--not-word", nargs="*", type=Path, metavar="FILE",
                   help="recordings that woke the agent by mistake: stop waking on them")
    p.add_argument("--list", action="store_true", help="show what was learned")
    p.add_argument("--reset", action="store_true", help="forget everything learned")
    p.add_argument("files", nargs="*", type=Path, metavar="FILE", help="WAV/FLAC, one utterance each")

    p = add("anomaly-score", _anomaly_score)
    p.add_argument("--input", action="append", type=Path, required=True,
                   help="CSV file or folder (repeatable)")
    p.add_argument("--output", action="append", type=Path, required=True,
                   help="CSV file or folder (repeatable, one per --input); never one of the inputs")
    p.add_argument("--group", action="store_true",
                   help="score every input file as one device group (one output per file): a device alert "
                        "puts alert=1 on the rows of the streams it names")
    p.add_argument("--plot", type=_plot_path, default=None, metavar="DIR",
                   help="draw one PNG per stream: values, score, alerts (and labelled windows)")
    p.add_argument("--labels", type=Path, default=None, metavar="FILE",
                   help="labelled anomaly windows for --plot (NAB combined_windows.json layout)")
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
