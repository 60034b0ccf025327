#!/usr/bin/env bash
# The main job on a fresh Debian machine: provision, then `milterd demo` (Domain Security end to
# end on loopback: a private MTA + milterd, sends in every TLS case, a printed summary).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh
exec .venv/bin/milterd demo "$@"
