#!/usr/bin/env bash
# Build a thread-per-connection libmilter and a pymilter 1.0.5 wheel statically linked to it.
#
# Debian's libmilter is built with _FFR_WORKERS_POOL: every milter command that is not followed at
# once by another goes worker -> pipe -> controller poll() -> condvar -> worker, and milterd spends
# about half its CPU in the kernel on that.  Upstream's default (no _FFR_WORKERS_POOL) is one
# thread per MTA connection blocking in read() on its own socket.  Debian ships no such build, so
# this script makes one from Debian's own source, with Debian's other libmilter options.
#
# Usage: scripts/build-libmilter.sh [VENV]
#   Builds (once) .cache/libmilter/wheels/pymilter-1.0.5-<python tag>-*.whl; with VENV, builds it
#   for VENV's python and installs it there (pip --force-reinstall --no-deps).  Without VENV the
#   wheel is built for $PYTHON (default python3).  Every step whose result exists is skipped.
set -euo pipefail

die() { echo "build-libmilter: ERROR: $*" >&2; exit 1; }
log() { echo "build-libmilter: $*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || die "cannot locate the repository"
cache=$repo/.cache/libmilter
dl=$cache/downloads
prefix=$cache/prefix            # lib/libmilter.a (alone, so -L finds no .so) + include/libmilter
wheels=$cache/wheels/interp-kept   # a new folder when the pymilter patch changes

SM=8.17.1.9
DEBREV=2+deb12u2                # the libmilter1.0.1/libmilter-dev version installed on Debian 12
POOL=http://deb.debian.org/debian/pool/main/s/sendmail
DSC=sendmail_${SM}-${DEBREV}.dsc
# Plain http: pin the .dsc; it in turn pins the tarballs.  Same for the sdist from PyPI.
# Debian drops superseded versions from the pool at point releases: when the download 404s, move
# SM/DEBREV to the current version and pin its .dsc (checked against apt's signed Sources index).
# Until then scripts/setup.sh carries on with Debian's libmilter and the threads tests fail.
DSC_SHA256=26527eb89e9168245ec3725848af51113b0ba78569417c147c6865310fb4cc64
PYMILTER=pymilter-1.0.5.tar.gz
PYMILTER_SHA256=2fac54d5b5ccca87786ad25eb0057a40bee6d5d3f71d7a6d5fe495ab6e460c3f

venv=${1:-}
if [ -n "$venv" ]; then
  py=$venv/bin/python
  [ -x "$py" ] || die "$py not found: '$venv' is not a venv (create it with python3 -m venv)"
else
  py=${PYTHON:-python3}
  command -v "$py" >/dev/null || die "no $py"
fi
for t in curl gcc m4 make ar nm ldd sha256sum tar patch; do
  command -v "$t" >/dev/null || die "$t is missing (apt-get install build-essential m4 curl patch)"
done

mkdir -p "$dl" "$wheels"
exec 9>"$cache/.lock"
flock -w 600 9 || die "timed out waiting for $cache/.lock"

check_sha() { echo "$2  $1" | sha256sum -c --quiet - >/dev/null 2>&1; }
# No grep -q after a pipe: under pipefail an early exit SIGPIPEs nm/ldd and flips the result.
has() { "${@:2}" 2>/dev/null | grep -E "$1" >/dev/null; }

# ---- 1. Debian's source, verified ---------------------------------------------------------------
fetch() {  # fetch NAME SHA256: a cached file was verified when it was downloaded
  [ -s "$dl/$1" ] && return
  log "downloading $1"
  curl -fsS --retry 3 -o "$dl/$1.part" "$POOL/$1" || die "download of $POOL/$1 failed"
  check_sha "$dl/$1.part" "$2" || { rm -f "$dl/$1.part"; die "sha256 mismatch for $1"; }
  mv "$dl/$1.part" "$dl/$1"
}
dsc_sha() {  # the Checksums-Sha256 entry of a file in the .dsc
  awk -v f="$1" '/^Checksums-Sha256:/ {s = 1; next} /^[^ ]/ {s = 0} s && $3 == f {print $1}' "$dl/$DSC"
}
fetch "$DSC" "$DSC_SHA256"
ORIG=sendmail_${SM}.orig.tar.gz
DEBTAR=sendmail_${SM}-${DEBREV}.debian.tar.xz
for f in "$ORIG" "$DEBTAR"; do
  sum=$(dsc_sha "$f"); [ -n "$sum" ] || die "$f is not listed in $DSC"
  fetch "$f" "$sum"
done

src=$cache/src/sendmail-$SM
if [ ! -d "$src" ]; then
  log "unpacking and patching the source"
  tmp=$(mktemp -d "$cache/src.XXXXXX")
  tar -xzf "$dl/$ORIG" -C "$tmp" && tar -xJf "$dl/$DEBTAR" -C "$tmp" || die "cannot unpack the source"
  # Only Debian's patches that change libmilter's code: "fd:" sockets (systemd socket
  # activation) and logging "terminating" at debug level.  The rest are sendmail or packaging.
  for p in socket_activation log-stop-at-debug-level; do
    patch -d "$tmp/sendmail-$SM" -p1 -s <"$tmp/debian/patches/$p.patch" || die "patch $p failed"
  done
  mkdir -p "$cache/src" && mv "$tmp/sendmail-$SM" "$src" && rm -rf "$tmp"
fi

# ---- 2. libmilter.a ---------------------------------------------------------------------------
if [ ! -s "$prefix/lib/libmilter.a" ]; then
  log "building libmilter.a (thread per connection)"
  # Debian's debian/build/site.config.m4.in and configure.ac for libmilter, MINUS
  # -D_FFR_WORKERS_POOL=1 (the point of this build):
  #  - SM_CONF_POLL=1: poll() instead of select() for the read timeout (no FD_SETSIZE limit);
  #  - NETINET6 + HAS_GETHOSTBYNAME2: inet6: sockets (Debian's sm_envdef); the HAS*/flock ones
  #    are harmless there and kept for parity; _FFR_MILTER_ROOT_UNSAFE is Debian's too;
  #  - Debian does not set _FFR_MDS_NEGOTIATE, so neither do we (mfapi.h must match pymilter);
  #  - -fPIC: the archive goes into a Python extension (.so); the rest is dpkg-buildflags'
  #    hardening for C on amd64.
  cat >"$cache/site.config.m4" <<'EOF'
define(`confCC', `gcc')
define(`confOPTIMIZE', `-g -O2 -fstack-protector-strong -Wformat -Werror=format-security -Wdate-time -D_FORTIFY_SOURCE=2 -fPIC')
APPENDDEF(`confENVDEF', `-DNETINET6 -DHAS_GETHOSTBYNAME2=1 -DHASFCHMOD=1 -DHASSETRLIMIT=1 -DHASFLOCK=1')
APPENDDEF(`conf_libmilter_ENVDEF', `-DSM_CONF_POLL=1 -D_FFR_MILTER_ROOT_UNSAFE')
EOF
  (cd "$src/libmilter" && sh ./Build -c -f "$cache/site.config.m4") >"$cache/build.log" 2>&1 ||
    die "libmilter build failed; see $cache/build.log"
  a=$(ls "$src"/obj.*/libmilter/libmilter.a 2>/dev/null | head -1 || true)
  [ -n "$a" ] || die "Build produced no libmilter.a; see $cache/build.log"
  if has mi_pool_controller_init nm "$a"; then die "$a still has the workers pool"; fi
  has ' T smfi_main$' nm "$a" || die "$a has no smfi_main"
  rm -rf "$prefix.tmp" && mkdir -p "$prefix.tmp/lib" "$prefix.tmp/include/libmilter"
  cp "$a" "$prefix.tmp/lib/" && cp "$src"/include/libmilter/mf{api,def}.h "$prefix.tmp/include/libmilter/"
  rm -rf "$prefix" && mv "$prefix.tmp" "$prefix"
fi

# ---- 3. pymilter wheel --------------------------------------------------------------------------
if [ ! -s "$dl/$PYMILTER" ]; then
  log "downloading the pymilter 1.0.5 sdist"
  "$py" -m pip download -q --no-binary :all: --no-deps pymilter==1.0.5 -d "$dl" ||
    die "pip download pymilter==1.0.5 failed"
fi
check_sha "$dl/$PYMILTER" "$PYMILTER_SHA256" || die "sha256 mismatch for $dl/$PYMILTER"

tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])') || die "$py does not run"
wheel=$(ls "$wheels"/pymilter-1.0.5-"$tag"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  log "building the pymilter wheel for $tag"
  tmp=$(mktemp -d "$cache/wheel.XXXXXX")
  # LDFLAGS go before setup.py's -L/usr/lib/libmilter, and $prefix/lib holds only the .a, so
  # -lmilter resolves to it; -I picks the matching headers.
  tar -xzf "$dl/$PYMILTER" -C "$tmp" || die "cannot unpack $PYMILTER"
  # pymilter's milter_main() sets its interpreter pointer to NULL when smfi_main() returns; with
  # one thread per connection, sessions outlive smfi_main() (milterd's graceful stop waits for
  # them), and a callback that starts then calls PyThreadState_New(NULL): SIGSEGV on a restart
  # under traffic.  Keep the pointer (milterd calls main() once per process).
  src=$tmp/${PYMILTER%.tar.gz}
  grep -q '^  interp = NULL;$' "$src/miltermodule.c" || die "pymilter patch: 'interp = NULL;' not found"
  sed -i 's|^  interp = NULL;$|  /* interp kept: sessions may outlive smfi_main() (milterd build-libmilter.sh) */|' \
    "$src/miltermodule.c"
  LDFLAGS="-L$prefix/lib" CFLAGS="-I$prefix/include" \
    "$py" -m pip wheel -q --no-deps --no-cache-dir -w "$tmp" "$src" >"$cache/wheel.log" 2>&1 ||
    die "pymilter wheel build failed; see $cache/wheel.log"
  w=$(ls "$tmp"/pymilter-*.whl) || die "no wheel in $tmp"
  "$py" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1])
n = [m for m in z.namelist() if m.startswith("milter") and m.endswith(".so")][0]
open(sys.argv[2], "wb").write(z.read(n))' "$w" "$tmp/milter.so" || die "no milter*.so in $w"
  if has libmilter ldd "$tmp/milter.so"; then die "milter.so links libmilter.so dynamically"; fi
  if has mi_pool_controller_init nm -D "$tmp/milter.so"; then die "milter.so has the workers pool"; fi
  has ' T smfi_main$' nm -D "$tmp/milter.so" || die "milter.so does not contain libmilter"
  mv "$w" "$wheels/" && rm -rf "$tmp"
  wheel=$wheels/$(basename "$w")
fi
log "wheel: $wheel"

# ---- 4. install into VENV -----------------------------------------------------------------------
[ -n "$venv" ] || exit 0
same=$("$py" - "$wheel" <<'EOF' 2>/dev/null || true
import sys, zipfile, milter
z = zipfile.ZipFile(sys.argv[1])
n = [m for m in z.namelist() if m.startswith("milter") and m.endswith(".so")][0]
print(open(milter.__file__, "rb").read() == z.read(n))
EOF
)
if [ "$same" = True ]; then
  log "$venv already has this wheel's milter module"
else
  log "installing into $venv"
  "$py" -m pip install -q --force-reinstall --no-deps "$wheel" || die "pip install into $venv failed"
fi
so=$("$py" -c 'import milter; print(milter.__file__)') || die "import milter fails in $venv"
if has libmilter ldd "$so"; then die "$so links libmilter.so"; fi
log "ok: $so (libmilter thread per connection, static)"
