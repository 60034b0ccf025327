#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: provisions everything (idempotently), then runs
# pytest.  Extra arguments go to pytest (e.g. `scripts/test.sh -k postfix -x`).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh
bash scripts/setup-postgres.sh   # Debian's PostgreSQL server for the store tests (private clusters: milterd/lab/postgres.py)
# Sendmail is provisioned by its own script when present (private root, no package conflict).
if [ -f scripts/setup-sendmail.sh ]; then bash scripts/setup-sendmail.sh; fi
# A private Postfix 3.10 (built once from Debian's pinned upstream tarball) for the TLSRPT answers.
bash scripts/setup-postfix310.sh
exec .venv/bin/python -m pytest "$@"
