#!/usr/bin/env bash
# Idempotent provisioning of Debian's PostgreSQL server for the store tests and labs
# (milterd/lab/postgres.py runs private clusters: own data directory, loopback port).
# Installs the `postgresql` package (Debian 12: postgresql-15, binaries in
# /usr/lib/postgresql/15/bin, and the `postgres` system user the lab runs the server as) when no
# initdb is there, without creating or starting the system's "main" cluster: postgresql-common is
# installed first and told create_main_cluster = false.  Safe to run again: checks before it acts.
set -euo pipefail

log() { echo "setup-postgres: $*" >&2; }

have_server() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ] && return 0
  done
  return 1
}

if have_server && getent passwd postgres >/dev/null; then
  log "PostgreSQL server present ($(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' '))"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
apt_install() { $SUDO apt-get install -y -qq --no-install-recommends "$@"; }

$SUDO apt-get update -qq
if ! dpkg-query -W -f='${Status}' postgresql-common 2>/dev/null | grep -q "install ok installed"; then
  apt_install postgresql-common
fi
# No system cluster: the tests run their own, and nothing should listen on 5432 because of us.
conf=/etc/postgresql-common/createcluster.conf
if [ -f "$conf" ] && ! grep -Eq '^[[:space:]]*create_main_cluster[[:space:]]*=[[:space:]]*false' "$conf"; then
  $SUDO sed -ri 's/^[#[:space:]]*(create_main_cluster)[[:space:]]*=.*$/\1 = false/' "$conf"
  grep -q '^create_main_cluster = false' "$conf" || echo 'create_main_cluster = false' | $SUDO tee -a "$conf" >/dev/null
fi
apt_install postgresql
have_server || { log "ERROR: postgresql installed, but no initdb/pg_ctl under /usr/lib/postgresql"; exit 1; }
getent passwd postgres >/dev/null || { log "ERROR: no postgres system user after installing postgresql"; exit 1; }
log "PostgreSQL server installed ($(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' '))"
