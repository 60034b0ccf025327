#!/usr/bin/env bash
# Idempotent set-up of everything milterd and its tests need on a fresh Debian machine:
# Debian's postfix (never started by the package), libmilter-dev (for pymilter), swaks, openssl,
# the tools to build and test the Debian package (systemd-nspawn, debootstrap, dpkg-dev),
# and a virtualenv at .venv with milterd installed in editable mode plus the test extras, whose
# pymilter is linked to a thread-per-connection libmilter (scripts/build-libmilter.sh: Debian's
# worker-pool build costs milterd ~30% more CPU per message; README "Performance").
# MILTERD_LIBMILTER=debian keeps pymilter on Debian's libmilter instead.
# Safe to run again: each step checks before it acts.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

# systemd-container (systemd-nspawn), debootstrap (+ keyring, gpgv), dpkg-dev: the Debian package
# (scripts/build-deb.sh) and its test on a pristine Debian 12 booted under systemd
# (tests/test_deb_package.py); util-linux gives nsenter, mount handles the overlays.
need_pkgs=(postfix libmilter-dev swaks openssl gcc libc6-dev m4 make binutils patch xz-utils curl
           iproute2 procps prometheus systemd python3 python3-venv python3-dev
           systemd-container debootstrap debian-archive-keyring gpgv dpkg-dev util-linux mount)
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # "No configuration": the package writes no main.cf and starts nothing; tests run private instances.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The venv is built from Debian's own python3 (the interpreter a Debian mail admin runs, with
# Debian's security backports, e.g. the strict email.utils.getaddresses of CVE-2023-27043), not
# from whatever python3 comes first on PATH (a pyenv build here).  PYTHON overrides it.
py=${PYTHON:-/usr/bin/python3}
[ -x "$py" ] || py=python3
want_home=$(dirname "$("$py" -c 'import os,sys; print(os.path.realpath(sys.executable))')")
if [ -f .venv/pyvenv.cfg ] && ! grep -qx "home = $want_home" .venv/pyvenv.cfg; then
  echo "setup: .venv was built from another python ($(grep '^home' .venv/pyvenv.cfg)); rebuilding from $py" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.milterd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[test]"
  touch "$stamp"
fi
if [ "${MILTERD_LIBMILTER:-threads}" != debian ]; then
  # If the pinned Debian source ever leaves the mirror, keep going on Debian's libmilter: milterd
  # works with it (slower), and the tests that expect the threads build fail and say why.
  bash scripts/build-libmilter.sh .venv ||
    echo "setup: WARNING: scripts/build-libmilter.sh failed; pymilter stays on Debian's libmilter" >&2
fi
