#!/usr/bin/env bash
# Installs the Debian packages home-agent needs, when running as root and they are missing.
# Idempotent; a no-op (with a hint) for non-root users.
set -euo pipefail
want=(mosquitto mosquitto-clients libportaudio2 libsndfile1 espeak-ng sox)
if [[ "${1:-}" == "--train" ]]; then
  want+=(flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts)
fi
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "bootstrap: missing Debian packages (install them as root): ${missing[*]}" >&2
  exit 0
fi
echo "bootstrap: apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Packages that this release does not have are skipped rather than failing the whole setup.
apt-get install -y -qq --no-install-recommends "${missing[@]}" || {
  for pkg in "${missing[@]}"; do apt-get install -y -qq --no-install-recommends "$pkg" || echo "bootstrap: could not install $pkg" >&2; done
}
