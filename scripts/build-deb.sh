#!/usr/bin/env bash
# Build the Debian package: dist/milterd_<version>-1_<arch>.deb (Debian 12 "bookworm").
#
# milterd runs from a private virtualenv, /opt/milterd, built here from Debian's own
# /usr/bin/python3 (dh-virtualenv style): Debian 12's python3-cryptography (38), python3-pluggy
# (1.0), python3-dnspython (2.3), python3-prometheus-client (0.16) and python3-aiosmtpd (1.4.3)
# are all older than pyproject.toml's minimums (README "Install (Debian package)").  In it:
#   - packaging/requirements.txt, version- and sha256-pinned wheels from PyPI;
#   - pymilter from scripts/build-libmilter.sh: statically linked to a thread-per-connection
#     libmilter built from Debian's sendmail source (sha256-pinned);
#   - milterd itself, built from this work tree (tracked and untracked, not ignored files).
# Around it: /usr/bin/milterd, /etc/milterd/milterd.toml (conffile, packaging/milterd.toml),
# the systemd unit (contrib/systemd/milterd.service), contrib/ under /usr/share/milterd, and the
# maintainer scripts in packaging/debian/ (user milterd, /var/spool/postfix/milterd, unit).
#
# Usage: scripts/build-deb.sh [--force] [--ref COMMIT]     prints the .deb's path on stdout
#   --ref COMMIT (or MILTERD_DEB_REF=COMMIT): build that commit's files instead of the work tree.
# Idempotent: the package is rebuilt only when one of its inputs changed (--force: always).
# Network: only PyPI and Debian's mirror, and only for what is not cached in .cache/ yet.
# Needs: dpkg-deb, python3-venv, and what scripts/build-libmilter.sh needs (gcc, m4, make, curl);
# scripts/setup.sh installs them all.  Run as root or not (dpkg-deb --root-owner-group).
set -euo pipefail

die() { echo "build-deb: ERROR: $*" >&2; exit 1; }
log() { echo "build-deb: $*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || die "cannot locate the repository"
cd "$repo"
force=0
ref=${MILTERD_DEB_REF:-}
while (($#)); do
  case "$1" in
    --force) force=1 ;;
    --ref) ref=${2:?--ref needs a commit}; shift ;;
    *) die "usage: scripts/build-deb.sh [--force] [--ref COMMIT]" ;;
  esac
  shift
done

# Debian's interpreter, by its versioned name (the venv's bin/python3 links to it and the package
# depends on that python3.X package).
PYTHON=$(readlink -f /usr/bin/python3 2>/dev/null || true)
PREFIX=/opt/milterd
cache=$repo/.cache/deb
wheels=$cache/wheels
dist=$repo/dist

for t in dpkg-deb dpkg git sha256sum tar gzip; do
  command -v "$t" >/dev/null || die "$t is missing (scripts/setup.sh installs it)"
done
[ -x "$PYTHON" ] || die "/usr/bin/python3 is missing (apt-get install python3 python3-venv)"
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pyfull=$("$PYTHON" -c 'import platform; print(platform.python_version())')
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || die "python3-venv is missing (apt-get install python3-venv)"

arch=$(dpkg --print-architecture)

mkdir -p "$cache" "$wheels" "$dist"
exec 9>"$cache/.lock"
flock -w 900 9 || die "timed out waiting for $cache/.lock"

# ---- 0. the sources, and are they new? ------------------------------------------------------
# Default: the work tree (tracked and untracked-but-not-ignored files, as they are now).
# --ref REF (or MILTERD_DEB_REF=REF): the files of that commit instead (git archive).
paths=(pyproject.toml README.md milterd plugins contrib packaging scripts/build-deb.sh
       scripts/build-libmilter.sh)
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage=$work/root
venv=$stage$PREFIX
src=$work/src
mkdir -p "$stage" "$src"
if [ -n "$ref" ]; then
  git rev-parse --verify -q "$ref^{commit}" >/dev/null || die "no commit $ref"
  git archive --format=tar "$ref" -- "${paths[@]}" | tar -x -C "$src" || die "git archive $ref failed"
else
  git ls-files -z --cached --others --exclude-standard -- "${paths[@]}" |
    while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
    tar -c --null -T - -f - | tar -x -C "$src" || die "cannot copy the work tree"
fi
[ -f "$src/pyproject.toml" ] || die "no sources found (not a git work tree?)"
version=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$src/pyproject.toml")
debversion=${version}-1
deb=$dist/milterd_${debversion}_${arch}.deb
inputs=$( { printf '%s\n' "$version" "$arch" "$("$PYTHON" -VV)"
            (cd "$src" && find . -type f -print0 | sort -z | xargs -0 sha256sum) } |
          sha256sum | cut -d' ' -f1)
stamp=$deb.inputs
if [ "$force" = 0 ] && [ -s "$deb" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ]; then
  log "up to date: $deb"
  echo "$deb"
  exit 0
fi
log "sources: $(find "$src" -type f | wc -l) files from ${ref:-the work tree}"

log "creating the venv ($PYTHON, $("$PYTHON" -V))"
"$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input -q)

# Wheels: pinned with hashes, downloaded once into .cache/deb/wheels, then installed offline.
fetch_wheels() {  # requirements file
  if ! "${pip[@]}" download --no-deps --only-binary :all: --require-hashes -d "$wheels" \
       --no-index --find-links "$wheels" -r "$1" >/dev/null 2>&1; then
    log "downloading the wheels of $(basename "$1") from PyPI"
    "${pip[@]}" download --no-deps --only-binary :all: --require-hashes -d "$wheels" -r "$1" ||
      die "pip download -r $1 failed"
  fi
}
fetch_wheels "$src/packaging/requirements.txt"
fetch_wheels "$src/packaging/build-requirements.txt"
log "installing the pinned dependencies"
"${pip[@]}" install --no-index --find-links "$wheels" --require-hashes --only-binary :all: \
  -r "$src/packaging/requirements.txt" || die "installing packaging/requirements.txt failed"

# setuptools (>= 70.1 has bdist_wheel itself): to build milterd's wheel below, and pymilter's
# when .cache/libmilter holds none yet (a stock venv's pip 23.0.1 has no `wheel` package).
"${pip[@]}" install --no-index --find-links "$wheels" --require-hashes --only-binary :all: \
  -r "$src/packaging/build-requirements.txt" || die "installing setuptools failed"
log "pymilter with the thread-per-connection libmilter (scripts/build-libmilter.sh)"
# The work tree's script (its cache, .cache/libmilter, lives beside it).
bash "$repo/scripts/build-libmilter.sh" "$venv" || die "scripts/build-libmilter.sh failed"

log "building milterd $version from ${ref:-the work tree}"
"${pip[@]}" wheel --no-deps --no-build-isolation -w "$work/whl" "$src" >/dev/null ||
  die "building milterd's wheel failed"
"${pip[@]}" install --no-index --no-deps "$work"/whl/milterd-*.whl || die "installing milterd failed"
"${pip[@]}" check || die "pip check: the venv does not satisfy milterd's requirements"
(cd / && "$venv/bin/python" -I -c 'import milterd.cli, milterd.core.daemon, milterd_plugins.domain_security') ||
  die "milterd does not import in the venv"

# What was installed: into the package's docs, and a sanity check of the versions.
"${pip[@]}" uninstall -y setuptools pip >/dev/null || die "cannot remove pip/setuptools from the venv"
(cd / && "$venv/bin/python" -I -) >"$work/python-packages.txt" <<'EOF'
import importlib.metadata as md
for d in sorted(md.distributions(), key=lambda d: d.metadata["Name"].lower()):
    print(f'{d.metadata["Name"]}=={d.version}')
EOF

# ---- 2. relocate the venv to /opt/milterd -----------------------------------------------------
find "$venv" -name direct_url.json -path '*.dist-info/*' -delete   # file:// URLs of the build
find "$venv" -depth -name __pycache__ -type d -exec rm -rf {} +
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1              # no pip, nothing to activate
grep -rlF --null "$stage" "$venv" | xargs -0 -r sed -i "s#$stage##g"
if grep -rlF "$stage" "$venv" >&2; then die "the build path is still in the files above"; fi
head -1 "$venv/bin/milterd" | grep -Eqx "#!$PREFIX/bin/python3?" ||
  die "unexpected shebang in bin/milterd: $(head -1 "$venv/bin/milterd")"
# Byte-code with the installed paths, used without a timestamp check (dpkg owns the files; the
# unit's ProtectSystem=strict would not let Python write them at run time anyway).
"$venv/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash \
  -s "$stage" -p / "$venv/lib" >/dev/null || die "compileall failed"

# Shared libraries: only glibc's and zlib's (psycopg-binary links the system libz; the package
# depends on zlib1g) from the system; the wheels bundle the rest (OpenSSL, libffi, libpq).
while IFS= read -r -d '' so; do
  if LC_ALL=C ldd "$so" 2>&1 | grep -q 'not found'; then die "$so: unresolved libraries"; fi
  LC_ALL=C ldd "$so" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
    case "$lib" in
      "$venv"/*|*/libc.so.*|*/libm.so.*|*/libpthread.so.*|*/libdl.so.*|*/librt.so.*|*/libresolv.so.*|*/ld-linux*|*/libgcc_s.so.*|*/libz.so.1) ;;
      *) die "$so needs $lib, which the package does not depend on" ;;
    esac
  done
done < <(find "$venv" -name '*.so*' -type f -print0)

# ---- 3. the rest of the tree ------------------------------------------------------------------
install -d "$stage/usr/bin" "$stage/etc/milterd" "$stage/lib/systemd/system" \
  "$stage/usr/share/milterd" "$stage/usr/share/doc/milterd" "$stage/DEBIAN"
ln -s "$PREFIX/bin/milterd" "$stage/usr/bin/milterd"
install -m 0644 "$src/packaging/milterd.toml" "$stage/etc/milterd/milterd.toml"
install -m 0644 "$src/contrib/systemd/milterd.service" "$stage/lib/systemd/system/milterd.service"
# The TLS-RPT sender: installed, not enabled (it needs [tlsrpt] organization and contact first).
for u in milterd-tlsrpt.service milterd-tlsrpt.timer; do
  install -m 0644 "$src/contrib/systemd/$u" "$stage/lib/systemd/system/$u"
done
for d in postfix sendmail prometheus systemd; do
  cp -r "$src/contrib/$d" "$stage/usr/share/milterd/$d"
done
install -m 0644 "$src/README.md" "$stage/usr/share/doc/milterd/README.md"
install -m 0644 "$src/packaging/debian/copyright" "$stage/usr/share/doc/milterd/copyright"
install -m 0644 "$work/python-packages.txt" "$stage/usr/share/doc/milterd/python-packages.txt"
mtime=$(git log -1 --format=%cD "${ref:-HEAD}" 2>/dev/null || date -R)
printf 'milterd (%s) bookworm; urgency=medium\n\n  * Built by scripts/build-deb.sh from the milterd work tree.\n\n -- milterd developers <postmaster@localhost>  %s\n' \
  "$debversion" "$mtime" | gzip -9n >"$stage/usr/share/doc/milterd/changelog.Debian.gz"
find "$stage" -path "$stage/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
chmod -R go-w "$stage"

size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$debversion/" -e "s/@ARCH@/$arch/" -e "s/@INSTALLED_SIZE@/$size/" \
    -e "s/@PYTHON@/python$pyver (>= $pyfull)/" \
  "$src/packaging/debian/control.in" >"$stage/DEBIAN/control"
for f in postinst prerm postrm; do install -m 0755 "$src/packaging/debian/$f" "$stage/DEBIAN/$f"; done
for f in conffiles triggers; do install -m 0644 "$src/packaging/debian/$f" "$stage/DEBIAN/$f"; done
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -print0 | sort -z |
   xargs -0 md5sum | sed 's#  \./#  #') >"$stage/DEBIAN/md5sums"

# ---- 4. the .deb ------------------------------------------------------------------------------
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct "${ref:-HEAD}" 2>/dev/null || date +%s)}
rm -f "$deb" "$stamp"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb.tmp" >/dev/null || die "dpkg-deb failed"
mv "$deb.tmp" "$deb"
echo "$inputs" >"$stamp"
log "built $deb ($(du -k "$deb" | cut -f1) KiB, installed $size KiB)"
echo "$deb"
