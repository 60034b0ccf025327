#!/usr/bin/env bash
# Idempotent provisioning of a private Postfix 3.10 (built from the upstream v3.10.x source tag)
# for the TLSRPT socketmap-answer test (tests/test_postfix_tlsrpt_policy.py).  The system Postfix
# (Debian 12: 3.7) is not touched: the build is installed under a private root and run with
# daemon_directory/command_directory/meta_directory pointing there.
#
#   1. apt-get install the build dependencies that are missing (libdb5.3-dev; gcc/make/libssl-dev
#      are expected);
#   2. take the Postfix source: $POSTFIX_SRC (a tree or a .tar.gz), else a git mirror given by
#      $POSTFIX_GIT at tag $POSTFIX_TAG, else (the default, as in CI) Debian's upstream tarball
#      postfix_3.10.13.orig.tar.gz from the Debian archive, checked against its pinned SHA-256;
#   3. make makefiles (TLS, Berkeley DB, no PCRE/LDAP/SASL) && make;
#   4. make non-interactive-package into <cache>/root (atomically: temp dir, then rename).
#
# Layout (default <repo>/.cache/postfix310, override with POSTFIX310_CACHE=/abs/path):
#   <cache>/root/usr/sbin/postfix              command_directory
#   <cache>/root/usr/libexec/postfix/          daemon_directory
#   <cache>/root/etc/postfix/                  meta_directory (postfix-files, main.cf defaults)
# Usage: scripts/setup-postfix310.sh [--print-root]
set -euo pipefail

die() { echo "setup-postfix310: ERROR: $*" >&2; exit 1; }
log() { echo "setup-postfix310: $*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || die "cannot locate the repository"
cache=${POSTFIX310_CACHE:-$repo/.cache/postfix310}
tag=${POSTFIX_TAG:-v3.10.13}
git_dir=${POSTFIX_GIT:-}
# Debian trixie's upstream tarball of 3.10.13 (Sources: postfix 3.10.13-0+deb13u1), pinned.
orig_url=${POSTFIX_ORIG_URL:-http://deb.debian.org/debian/pool/main/p/postfix/postfix_3.10.13.orig.tar.gz}
orig_sha256=de6526fb11bbf20fcfa5aa4b67e88cc6b246cad614a9bcb4b006f457ba3788bc
root=$cache/root
stamp=$root/.provisioned

if [ -f "$stamp" ] && [ -x "$root/usr/sbin/postfix" ] && [ -x "$root/usr/libexec/postfix/smtp" ]; then
  log "private Postfix already provisioned in $root ($(cat "$stamp"))"
  [ "${1:-}" = "--print-root" ] && echo "$root"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 900 9 || die "timed out waiting for lock $cache/.lock"

for tool in gcc make; do command -v $tool >/dev/null || die "$tool missing"; done
missing=()
for p in libdb5.3-dev libssl-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  inst() { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; }
  inst || { $SUDO apt-get update -qq >&2 || true; inst; } || die "apt-get install ${missing[*]} failed"
fi

src=$cache/src
rm -rf "$src" && mkdir -p "$src"
if [ -n "${POSTFIX_SRC:-}" ]; then
  if [ -d "$POSTFIX_SRC" ]; then cp -a "$POSTFIX_SRC"/. "$src"/
  else tar -xzf "$POSTFIX_SRC" -C "$src" --strip-components=1; fi
elif [ -n "$git_dir" ]; then
  [ -d "$git_dir" ] || die "POSTFIX_GIT=$git_dir is not a git dir"
  git --git-dir="$git_dir" archive "$tag" postfix | tar -x -C "$src" --strip-components=1 \
    || die "cannot export $tag from $git_dir"
else
  tarball=$cache/$(basename "$orig_url")
  if ! echo "$orig_sha256  $tarball" | sha256sum -c --status 2>/dev/null; then
    log "downloading $orig_url"
    curl -fsS --retry 3 -o "$tarball.part" "$orig_url" || die "cannot download $orig_url"
    echo "$orig_sha256  $tarball.part" | sha256sum -c --status \
      || die "$orig_url: SHA-256 mismatch (expected $orig_sha256)"
    mv "$tarball.part" "$tarball"
  fi
  tar -xzf "$tarball" -C "$src" --strip-components=1 || die "cannot unpack $tarball"
fi
cd "$src"
log "building Postfix ${tag} in $src"
make -s makefiles CCARGS="-DUSE_TLS -DNO_PCRE -DNO_NIS -DNO_LDAP -DNO_SASL" \
  AUXLIBS="-lssl -lcrypto" >"$cache/build.log" 2>&1 || { tail -30 "$cache/build.log"; die "make makefiles failed"; }
make -s -j"$(nproc)" >>"$cache/build.log" 2>&1 || { tail -30 "$cache/build.log"; die "make failed"; }
tmp=$(mktemp -d "$cache/root.XXXXXX")
make -s non-interactive-package install_root="$tmp" \
  config_directory=/etc/postfix meta_directory=/etc/postfix \
  daemon_directory=/usr/libexec/postfix command_directory=/usr/sbin \
  sendmail_path=/usr/sbin/sendmail newaliases_path=/usr/bin/newaliases \
  mailq_path=/usr/bin/mailq manpage_directory=/usr/share/man \
  shlib_directory=no html_directory=no readme_directory=no \
  >>"$cache/build.log" 2>&1 || { tail -30 "$cache/build.log"; die "make install failed"; }
"$tmp/usr/sbin/postconf" -d -c "$tmp/etc/postfix" mail_version >&2 || die "built postconf does not run"
"$tmp/usr/sbin/postconf" -d -c "$tmp/etc/postfix" mail_version | sed 's/.*= //' >"$tmp/.provisioned"
rm -rf "$root" && mv "$tmp" "$root"
chmod 755 "$cache" "$root"
log "private Postfix $(cat "$stamp") in $root"
[ "${1:-}" = "--print-root" ] && echo "$root"
exit 0
