#!/usr/bin/env bash
# Builds the ModelMora CPU image, also where Docker Hub is out of reach (docs/deployment.md).
#
#   deploy/docker/build.sh [--tag NAME] [--base IMAGE] [--extras server,postgres,redis]
#                          [--torch-variant cpu|cu128|...] [--wheelhouse]
#
# 1. The base. With --base (e.g. python:3.11-slim-bookworm) that image. Without: a Debian bookworm
#    minbase made by debootstrap from the apt mirror this machine already uses (/etc/apt/sources.list
#    and sources.list.d), kept as a tarball in $MODELMORA_BASE_CACHE (default /var/cache/modelmora-deploy)
#    under a key of mirror and ISO week, so a machine builds it at most once a week, and `docker import`ed.
# 2. The wheels, in build/docker/wheels, which the Dockerfile binds read-only (never a layer): the torch
#    wheel of --torch-variant (default cpu; TORCH_WHEEL names a file, else pip finds
#    torch==$TORCH_VERSION+<variant> through the host's configuration, else on download.pytorch.org)
#    and, with --wheelhouse, every wheel modelmora[$EXTRAS] needs (--extras, default
#    server,postgres,redis), downloaded by the host's pip with its index, mirrors and CA.
# 3. docker build with BuildKit and --build-arg BASE=... . By default pip inside the build reaches the
#    host's index (PIP_INDEX_URL or pip's global.index-url, else PyPI) with the host's CA bundle (pip's
#    global.cert or PIP_CERT) as the BuildKit secret pip_ca: mounted for that one step, in no layer.
#    With --wheelhouse it uses no index at all (an air-gapped site); the wheels must then suit the
#    image's Python (PYTHON must be a CPython 3.11 on linux x86_64, and markers on the full version,
#    e.g. async-timeout for python < 3.11.3, must come out the same: Debian's python3 is 3.11.2).
#
# Environment: DOCKER (a docker CLI with BuildKit: `docker` when it has buildx, else Debian's
# /usr/bin/docker), PYTHON (default python3), TORCH_WHEEL, TORCH_VERSION (2.13.0), MIRROR and
# SECURITY_MIRROR (override the apt mirrors read from this machine), MODELMORA_BASE_CACHE.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TAG=modelmora:latest
BASE=""
ONLINE=1
EXTRAS=server,postgres,redis
VARIANT=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    --extras) EXTRAS=$2; shift 2 ;;
    --torch-variant) VARIANT=$2; shift 2 ;;
    --online) ONLINE=1; shift ;;
    --wheelhouse) ONLINE=0; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SUITE=bookworm

log() { printf '[build.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s; }

if [ -z "${DOCKER:-}" ]; then
  # Debian's docker.io 20.10 CLI has BuildKit built in; a newer CLI needs the buildx plugin.
  if docker buildx version >/dev/null 2>&1; then DOCKER=docker
  elif [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker
  else DOCKER=docker
  fi
fi
"$DOCKER" info >/dev/null 2>&1 || die "no docker daemon answers ($DOCKER info)"

# ---- apt mirrors: "URI SUITE" for every deb line of this machine's sources
apt_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } print $i, $(i + 1) }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
      { t = u = s = ""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^Types:/) t = $i; else if ($i ~ /^URIs:/) u = $i; else if ($i ~ /^Suites:/) s = $i
        }
        if (t !~ /[ \t]deb([ \t]|$)/) next
        sub(/^URIs:[ \t]*/, "", u); sub(/^Suites:[ \t]*/, "", s)
        n = split(u, U, /[ \t]+/); m = split(s, S, /[ \t]+/)
        for (a = 1; a <= n; a++) for (b = 1; b <= m; b++) print U[a], S[b] }' "$f"
  done
}

make_base() {
  if [ -z "${MIRROR:-}" ]; then
    MIRROR=$(apt_sources | awk -v s="$SUITE" '$2 == s { print $1; exit }')
  fi
  if [ -z "${SECURITY_MIRROR+set}" ]; then
    SECURITY_MIRROR=$(apt_sources | awk -v s="$SUITE-security" '$2 == s { print $1; exit }')
  fi
  [ -n "$MIRROR" ] || die "no apt source for $SUITE on this machine: set MIRROR=http://.../debian"
  local cache=${MODELMORA_BASE_CACHE:-/var/cache/modelmora-deploy}
  mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ] || cache=${XDG_CACHE_HOME:-$HOME/.cache}/modelmora-deploy
  mkdir -p "$cache"
  local key week tarball
  key=$(printf '%s\n' "$MIRROR" "$SECURITY_MIRROR" "$SUITE" | sha256sum | cut -c1-12)
  week=$(date -u +%G-w%V)
  tarball=$cache/$SUITE-minbase-$key-$week.tar.gz
  BASE=modelmora-base:$SUITE-$key-$week
  if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    log "base $BASE (already imported)"
    return
  fi
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
    log "debootstrap $SUITE from $MIRROR (security: ${SECURITY_MIRROR:-none})"
    local t0 tmp
    t0=$(now)
    tmp=$(mktemp -d "$cache/rootfs.XXXXXX")
    # shellcheck disable=SC2064  # expand now: tmp is local
    trap "rm -rf '$tmp'" EXIT
    debootstrap --variant=minbase "$SUITE" "$tmp/root" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 \
      || { tail -20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
    {
      echo "deb $MIRROR $SUITE main"
      echo "deb $MIRROR $SUITE-updates main"
      [ -z "$SECURITY_MIRROR" ] || echo "deb $SECURITY_MIRROR $SUITE-security main"
    } >"$tmp/root/etc/apt/sources.list"
    # What an image should not carry: downloaded packages, package lists, this machine's names.
    rm -rf "$tmp"/root/var/cache/apt/archives/*.deb "$tmp"/root/var/lib/apt/lists/* \
      "$tmp/root/etc/hostname" "$tmp/root/etc/resolv.conf"
    tar -C "$tmp/root" --numeric-owner -czf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$tmp"
    trap - EXIT
    find "$cache" -maxdepth 1 -name "$SUITE-minbase-$key-*.tar.gz" ! -name "${tarball##*/}" -delete
    log "base tarball $tarball in $(($(now) - t0)) s"
  fi
  "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    "$tarball" "$BASE" >/dev/null
  log "base $BASE imported from $tarball"
}

fill_wheels() {
  "$PYTHON" - <<'EOF' || die "PYTHON=$PYTHON must be CPython 3.11 on linux x86_64 (Debian bookworm's python); or use --online"
import platform, sys
assert sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11)
assert sys.platform == "linux" and platform.machine() == "x86_64"
EOF
  local wheels=$ROOT/build/docker/wheels stamp
  stamp=$( { cat "$ROOT/pyproject.toml"; echo "online=$ONLINE extras=$EXTRAS torch=$TORCH_VERSION+$VARIANT ${TORCH_WHEEL:-}"; } | sha256sum | cut -c1-16)
  if [ -f "$wheels/.stamp" ] && [ "$(cat "$wheels/.stamp")" = "$stamp" ]; then
    log "wheels in $wheels are up to date"
    return
  fi
  rm -rf "$wheels"
  mkdir -p "$wheels"
  local t0
  t0=$(now)
  if [ -n "${TORCH_WHEEL:-}" ]; then
    cp "$TORCH_WHEEL" "$wheels/"
  elif ! "$PYTHON" -m pip download -q --no-deps -d "$wheels" "torch==$TORCH_VERSION+$VARIANT" 2>/dev/null; then
    log "torch $TORCH_VERSION+$VARIANT is not reachable through pip's configuration: trying the PyTorch index"
    "$PYTHON" -m pip download -q --no-deps -d "$wheels" --index-url "https://download.pytorch.org/whl/$VARIANT" \
      "torch==$TORCH_VERSION+$VARIANT"
  fi
  local torch_wheel
  torch_wheel=$(find "$wheels" -maxdepth 1 -name 'torch-*.whl' | head -n 1)
  [ -n "$torch_wheel" ] || die "no torch wheel"
  case "$torch_wheel" in *"+$VARIANT-"*) ;; *) die "$torch_wheel is not torch's $VARIANT build" ;; esac
  if [ "$ONLINE" = 0 ]; then
    # setuptools: the build backend of modelmora itself, which pip then finds here too.
    "$PYTHON" -m pip download -q -d "$wheels" --only-binary=:all: "$torch_wheel" "$ROOT[$EXTRAS]" \
      'setuptools>=69' wheel 2>&1 | grep -v '^WARNING: Location' >&2 || true
    [ -n "$(find "$wheels" -maxdepth 1 -name 'fastapi-*.whl')" ] || die "pip download of modelmora[server] failed"
  fi
  echo "$stamp" >"$wheels/.stamp"
  log "wheels: $(find "$wheels" -name '*.whl' | wc -l) files, $(du -sh "$wheels" | cut -f1), in $(($(now) - t0)) s"
}

t_start=$(now)
[ -n "$BASE" ] || make_base
fill_wheels
echo "$BASE" >"$ROOT/build/docker/base"  # for images built on the same base (deploy/ci)

build_args=(
  --build-arg "BASE=$BASE"
  --build-arg "EXTRAS=$EXTRAS"
  --build-arg "TORCH_VARIANT=$VARIANT"
  --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n 1)"
  --build-arg "REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)"
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
)
if [ "$ONLINE" = 1 ]; then
  index=${PIP_INDEX_URL:-$("$PYTHON" -m pip config get global.index-url 2>/dev/null || true)}
  index=${index:-https://pypi.org/simple}
  case "$index" in file:*) die "the index $index is a local folder the build cannot see: build without --online" ;; esac
  build_args+=(--build-arg "PIP_INDEX_URL=$index")
  ca=${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}
  if [ -n "$ca" ]; then
    build_args+=(--secret "id=pip_ca,src=$ca")
  fi
fi

log "docker build $TAG from $BASE"
t0=$(now)
DOCKER_BUILDKIT=1 "$DOCKER" build "${build_args[@]}" -t "$TAG" -f "$ROOT/Dockerfile" "$ROOT"
log "built $TAG in $(($(now) - t0)) s (all steps: $(($(now) - t_start)) s)"
size=$("$DOCKER" image inspect -f '{{.Size}}' "$TAG")
log "image size: $((size / 1000000)) MB; largest layers:"
"$DOCKER" history --no-trunc --human=false --format '{{.Size}}\t{{.CreatedBy}}' "$TAG" \
  | sort -rn | head -n 4 | awk -F '\t' '{ printf "  %6d MB  %s\n", $1 / 1000000, substr($2, 1, 100) }' >&2
