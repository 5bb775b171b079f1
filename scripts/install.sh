#!/usr/bin/env bash
# Install home-agent as a systemd service on Raspberry Pi OS / Debian (idempotent: run it again to upgrade).
#
#   sudo scripts/install.sh                      install or upgrade, then (re)start the service
#   sudo scripts/install.sh --no-start           install or upgrade, do not touch the running service
#   sudo scripts/install.sh --uninstall          remove the service and the venv; keep config and state
#   sudo scripts/install.sh --uninstall --purge  also remove /etc/home-agent and the state directory
#   scripts/install.sh --root /tmp/try --no-apt --no-systemctl   everything below /tmp/try, no root needed
#
# Switches (each overrides the environment variable named after it):
#   --root DIR         put every default path below DIR (DIR/opt/home-agent, DIR/etc/home-agent, ...)
#   --prefix DIR       PREFIX=/opt/home-agent          the virtualenv lives in DIR/venv
#                                                      (models: DIR/venv/share/home-agent/models)
#   --config-dir DIR   ETC_DIR=/etc/home-agent         config.toml is installed only when absent (kept on
#                                                      upgrade); config.toml.example is always refreshed
#   --unit-dir DIR     UNIT_DIR=/etc/systemd/system    home-agent.service
#   --state-dir DIR    STATE_DIR=/var/lib/home-agent   removed by --purge only (DynamicUser keeps it in
#                                                      /var/lib/private)
#   --python PY        PYTHON=python3                  interpreter for the venv (>= 3.11)
#   --wheel FILE       WHEEL=                          install this built wheel instead of the checkout
#   --no-apt           SKIP_APT=1                      do not install Debian packages
#   --no-systemctl     SYSTEMCTL=                      never call systemctl
#   PIP_ARGS=          extra pip arguments, e.g. "--no-index --find-links /media/usb/wheels"
set -euo pipefail

SERVICE=home-agent
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}
WHEEL=${WHEEL:-}
SKIP_APT=${SKIP_APT:-0}
SYSTEMCTL=${SYSTEMCTL-systemctl}

# Debian packages: the venv module, PortAudio (microphone) and libsndfile (WAV files) for the Python wheels.
REQUIRED_PACKAGES=(python3-venv libportaudio2 libsndfile1)
OPTIONAL_PACKAGES=(mosquitto-clients)  # mosquitto_sub / mosquitto_pub, handy to watch the agent's topics

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

mode=install
purge=0
start=1
root=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --uninstall) mode=uninstall ;;
    --purge) purge=1 ;;
    --no-start) start=0 ;;
    --no-apt) SKIP_APT=1 ;;
    --no-systemctl) SYSTEMCTL= ;;
    --root|--prefix|--config-dir|--unit-dir|--state-dir|--python|--wheel)
      [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
      case "$1" in
        --root) root=$2 ;;
        --prefix) PREFIX=$2 ;;
        --config-dir) ETC_DIR=$2 ;;
        --unit-dir) UNIT_DIR=$2 ;;
        --state-dir) STATE_DIR=$2 ;;
        --python) PYTHON=$2 ;;
        --wheel) WHEEL=$2 ;;
      esac
      shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
[[ $purge -eq 1 && $mode != uninstall ]] && die "--purge only goes with --uninstall"
[[ -z $root || $root == /* ]] || die "--root must be an absolute path, got '$root'"
root=${root%/}
PREFIX=${PREFIX:-$root/opt/home-agent}
ETC_DIR=${ETC_DIR:-$root/etc/home-agent}
UNIT_DIR=${UNIT_DIR:-$root/etc/systemd/system}
STATE_DIR=${STATE_DIR:-$root/var/lib/home-agent}
VENV=$PREFIX/venv
UNIT_FILE=$UNIT_DIR/$SERVICE.service
CONFIG=$ETC_DIR/config.toml
if [[ -n $WHEEL ]]; then
  [[ -f $WHEEL ]] || die "--wheel: no such file: $WHEEL"
  WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
fi

# Refuse paths that would make "rm -rf" dangerous.
for var in PREFIX ETC_DIR UNIT_DIR STATE_DIR; do
  value=${!var}
  [[ $value == /* ]] || die "$var must be an absolute path, got '$value'"
  [[ $value == / || $value == /usr || $value == /etc || $value == /var || $value == /opt ]] \
    && die "$var must not be '$value'"
done

# systemctl only when systemd runs this machine (sd_booted) and the unit goes where systemd looks.
systemd_usable() {
  [[ -n $SYSTEMCTL ]] && [[ -d /run/systemd/system ]] && command -v "$SYSTEMCTL" >/dev/null 2>&1 \
    && [[ $UNIT_DIR == /etc/systemd/system || $UNIT_DIR == /run/systemd/system ]]
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

install_packages() {
  [[ $SKIP_APT == 1 ]] && return 0
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    say "not a Debian system: make sure these are installed: ${REQUIRED_PACKAGES[*]}"
    return 0
  fi
  local missing=() optional=() pkg
  for pkg in "${REQUIRED_PACKAGES[@]}"; do installed "$pkg" || missing+=("$pkg"); done
  for pkg in "${OPTIONAL_PACKAGES[@]}"; do installed "$pkg" || optional+=("$pkg"); done
  [[ ${#missing[@]} -eq 0 && ${#optional[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]]; then
    [[ ${#missing[@]} -gt 0 ]] && die "missing Debian packages (run as root or install them): ${missing[*]}"
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  say "apt-get install ${missing[*]} ${optional[*]}"
  apt-get update -qq
  if [[ ${#missing[@]} -gt 0 ]]; then
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  for pkg in "${optional[@]}"; do
    apt-get install -y -qq --no-install-recommends "$pkg" || say "optional package $pkg not installed (skipped)"
  done
}

# The unit names /opt/home-agent and /etc/home-agent; follow PREFIX and ETC_DIR when they differ.
render_unit() {
  sed -e "s#/opt/home-agent/venv/#$VENV/#g" \
      -e "s#--config /etc/home-agent/config.toml#--config $CONFIG#g" \
      "$REPO_DIR/systemd/$SERVICE.service"
}

venv_ok() {
  [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null
}

do_install() {
  install_packages
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null \
    || die "$PYTHON is missing or older than 3.11 (set PYTHON=...)"

  mkdir -p "$PREFIX"
  if ! venv_ok; then
    [[ -e $VENV ]] && say "replacing the broken virtualenv $VENV"
    rm -rf "$VENV"
    say "creating the virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local source=${WHEEL:-$REPO_DIR}
  say "installing home-agent from $source into $VENV"
  # Not editable: the venv must not depend on this checkout. Models come with the wheel's data files.
  # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
  "$VENV/bin/python" -m pip install --quiet --upgrade $PIP_ARGS "$source"
  "$VENV/bin/home-agent" --version >/dev/null || die "the installed home-agent does not start"

  mkdir -p "$ETC_DIR"
  chmod 0755 "$ETC_DIR"
  if [[ -f $REPO_DIR/config.toml ]]; then
    install -m 0644 "$REPO_DIR/config.toml" "$ETC_DIR/config.toml.example"
    if [[ -e $CONFIG ]]; then
      say "keeping your $CONFIG (the documented example is $ETC_DIR/config.toml.example)"
    else
      install -m 0644 "$REPO_DIR/config.toml" "$CONFIG"
      say "installed the example config to $CONFIG: edit [agent] and [mqtt] for your home"
    fi
  fi
  config_valid=1
  if [[ -e $CONFIG ]] && ! "$VENV/bin/home-agent" check-config --config "$CONFIG"; then
    config_valid=0
    say "WARNING: $CONFIG is not valid for this version; fix it before starting the service"
  fi

  mkdir -p "$UNIT_DIR"
  local unit_changed=1
  if [[ -f $UNIT_FILE ]] && cmp -s <(render_unit) "$UNIT_FILE"; then
    unit_changed=0
  else
    render_unit > "$UNIT_FILE.tmp"
    chmod 0644 "$UNIT_FILE.tmp"
    mv -f "$UNIT_FILE.tmp" "$UNIT_FILE"
    say "installed $UNIT_FILE"
  fi

  if systemd_usable; then
    [[ $unit_changed -eq 1 ]] && "$SYSTEMCTL" daemon-reload
    "$SYSTEMCTL" enable --quiet "$SERVICE.service"
    if [[ $start -eq 1 && $config_valid -eq 1 ]]; then
      say "restarting $SERVICE"
      "$SYSTEMCTL" restart "$SERVICE.service"
      "$SYSTEMCTL" --no-pager --lines=0 status "$SERVICE.service" || true
      say "logs: journalctl -u $SERVICE -f"
    else
      say "enabled; start it with: systemctl restart $SERVICE"
    fi
  else
    say "systemd is not managing this system (or UNIT_DIR is not one of its folders); nothing started."
    say "on the target machine run: systemctl daemon-reload && systemctl enable --now $SERVICE"
    say "or run it in the foreground: $VENV/bin/home-agent run --config $CONFIG"
  fi
}

safe_rm() {
  # Only ever remove paths that are ours: named home-agent, or the virtualenv we created.
  local path=$1
  if [[ $path != *home-agent* ]] && ! [[ $path == "$VENV" && -f $path/pyvenv.cfg ]]; then
    die "refusing to remove '$path' (does not look like a home-agent path)"
  fi
  rm -rf -- "$path"
}

do_uninstall() {
  if systemd_usable && [[ -f $UNIT_FILE ]]; then
    "$SYSTEMCTL" disable --now --quiet "$SERVICE.service" || true
  fi
  if [[ -e $UNIT_FILE ]]; then
    rm -f -- "$UNIT_FILE"
    say "removed $UNIT_FILE"
    if systemd_usable; then
      "$SYSTEMCTL" daemon-reload
      "$SYSTEMCTL" reset-failed "$SERVICE.service" 2>/dev/null || true
    fi
  fi
  if [[ -e $VENV ]]; then
    safe_rm "$VENV"
    say "removed $VENV"
  fi
  rmdir --ignore-fail-on-non-empty "$PREFIX" 2>/dev/null || true
  if [[ $purge -eq 1 ]]; then
    local parent private
    parent=$(dirname "$STATE_DIR")
    private="$parent/private/$(basename "$STATE_DIR")"  # where DynamicUser= keeps the state
    for path in "$ETC_DIR" "$STATE_DIR" "$private"; do
      if [[ -e $path || -L $path ]]; then
        safe_rm "$path"
        say "removed $path"
      fi
    done
  else
    say "kept $ETC_DIR and $STATE_DIR (remove them too with --uninstall --purge)"
  fi
}

if [[ $mode == install ]]; then do_install; else do_uninstall; fi
