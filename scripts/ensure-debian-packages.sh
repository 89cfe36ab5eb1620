#!/usr/bin/env bash
# Install the Debian packages listed in $1 that are missing. Needs root (or
# sudo); says exactly what to do when it has neither.
set -euo pipefail
list=${1:?usage: ensure-debian-packages.sh LIST}
mapfile -t wanted < <(sed -e 's/#.*//' -e '/^\s*$/d' "$list")
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "error: missing Debian packages (${missing[*]}); run as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
