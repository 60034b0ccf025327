#!/usr/bin/env bash
# Idempotent provisioning of a private Sendmail 8.17 (Debian's sendmail-bin/-base/-cf) for the
# Sendmail end-to-end tests, WITHOUT installing the Debian sendmail packages (they conflict with
# postfix).  What it does:
#   1. apt-get install the runtime libraries/tools sendmail needs, only those missing (dpkg-query);
#   2. apt-get download sendmail-bin sendmail-base sendmail-cf into the cache;
#   3. dpkg -x them into a private root (atomically: extract to a temp dir, then rename);
#   4. check that the binary's shared libraries resolve and the cf macros are present.
# Steps 2-3 are skipped when the private root is already complete. "apt-get update" runs only if an
# install/download fails the first time.
#
# Layout (default cache dir: <repo>/.cache/sendmail, override with SENDMAIL_CACHE=/abs/path):
#   <cache>/debs/*.deb
#   <cache>/root/usr/libexec/sendmail/sendmail   the binary
#   <cache>/root/usr/share/sendmail/cf/m4/cf.m4  the cf macros
#
# Usage: scripts/setup-sendmail.sh [--print-root]     (works from any clone path)
# Exit status is non-zero, with a message on stderr, on any failure.
set -euo pipefail

die() { echo "setup-sendmail: ERROR: $*" >&2; exit 1; }
log() { echo "setup-sendmail: $*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || die "cannot locate the repository"
cache=${SENDMAIL_CACHE:-$repo/.cache/sendmail}
root=$cache/root
debs=$cache/debs
bin=$root/usr/libexec/sendmail/sendmail
cfm4=$root/usr/share/sendmail/cf/m4/cf.m4
stamp=$root/.provisioned

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "not root and no sudo: cannot apt-get install"
  SUDO="sudo"
fi

# Runtime dependencies of sendmail-bin (from its Depends:) + what the lab/tests use:
# m4 (build the .cf), openssl, util-linux (unshare), mount (mount --bind / overlay in the lab).
need_pkgs=(m4 openssl libdb5.3 libldap-2.5-0 liblockfile1 libnsl2 libsasl2-2 libssl3 libwrap0
           util-linux mount)
sm_pkgs=(sendmail-bin sendmail-base sendmail-cf)

apt_updated=0
apt_update_once() {
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    apt_updated=1
    # A failing update (e.g. one unreachable source) is not fatal by itself: the retry decides.
    $SUDO apt-get update -qq >&2 || log "WARNING: apt-get update failed; retrying anyway"
  fi
}

mkdir -p "$cache" || die "cannot create $cache"
# Serialise concurrent runs (e.g. two test sessions provisioning at once).
exec 9>"$cache/.lock"
flock -w 600 9 || die "timed out waiting for lock $cache/.lock"

# ---- 1. libraries and tools -----------------------------------------------------------------
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing missing packages: ${missing[*]}"
  # Install only these names; never the sendmail packages (they would remove postfix).
  inst() { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; }
  if ! inst; then
    apt_update_once
    inst || die "apt-get install ${missing[*]} failed"
  fi
fi

# ---- 2./3. download and extract the sendmail packages ---------------------------------------
if [ -f "$stamp" ] && [ -x "$bin" ] && [ -f "$cfm4" ]; then
  log "private sendmail already provisioned in $root ($(cat "$stamp"))"
else
  mkdir -p "$debs"
  have_debs() {
    local p
    for p in "${sm_pkgs[@]}"; do
      compgen -G "$debs/${p}_*.deb" >/dev/null || return 1
    done
  }
  if ! have_debs; then
    # APT::Sandbox::User=root: the cache dir need not be readable by the _apt user.
    download() { (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "${sm_pkgs[@]}" >&2) ; }
    log "apt-get download ${sm_pkgs[*]} -> $debs"
    if ! download; then
      apt_update_once
      download || die "apt-get download ${sm_pkgs[*]} failed (no Debian mirror reachable?)"
    fi
    have_debs || die "downloaded packages not found in $debs"
  fi
  tmp=$(mktemp -d "$cache/root.tmp.XXXXXX") || die "mktemp failed"
  trap 'rm -rf "$tmp"' EXIT
  versions=()
  for p in "${sm_pkgs[@]}"; do
    # newest file if several versions accumulated
    deb=$(ls -1 "$debs/${p}"_*.deb | sort -V | tail -n1)
    dpkg -x "$deb" "$tmp" || die "dpkg -x $deb failed"
    versions+=("$(basename "$deb")")
  done
  [ -x "$tmp/usr/libexec/sendmail/sendmail" ] || die "binary missing after extraction"
  [ -f "$tmp/usr/share/sendmail/cf/m4/cf.m4" ] || die "cf macros missing after extraction"
  # Debian ships the binary root:smmsp 2755; the private copy runs as root and needs no setgid
  # (and a non-setgid binary honours LD_* variables, should a shim ever be needed).
  chmod 0755 "$tmp/usr/libexec/sendmail/sendmail"
  printf '%s\n' "${versions[*]}" > "$tmp/.provisioned"
  rm -rf "$root"
  mv "$tmp" "$root"
  trap - EXIT
  log "extracted ${versions[*]} into $root"
fi

# ---- 4. sanity checks -----------------------------------------------------------------------
command -v m4 >/dev/null || die "m4 not on PATH"
command -v unshare >/dev/null || die "unshare (util-linux) not on PATH"
if ldd "$bin" 2>&1 | grep -q "not found"; then
  die "unresolved shared libraries for $bin: $(ldd "$bin" | grep 'not found' | tr -s ' \t\n' ' ')"
fi
[ "${1:-}" = "--print-root" ] && echo "$root"
log "ok: $bin"
exit 0
