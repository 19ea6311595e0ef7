#!/usr/bin/env bash
# The deployment checks of .ci/run, after the README's tests: install docker and debootstrap when
# missing, start dockerd when none answers (no systemd here), build the image from the local Debian
# base (deploy/docker/build.sh), then run it: tests/deploy marked `container` (the image alone, and
# the replicated compose stack on this machine's PostgreSQL and Redis). Any failure fails CI.
set -euo pipefail
cd "$(dirname "$0")/../.."
t0=$(date +%s)

missing=()
for pair in docker.io:/usr/bin/docker debootstrap:/usr/sbin/debootstrap \
            docker-compose:/usr/bin/docker-compose iptables:/usr/sbin/iptables; do
  [ -x "${pair#*:}" ] || missing+=("${pair%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "check_deploy: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's CLI: BuildKit built in (a newer docker CLI on PATH may lack buildx).
export DOCKER=/usr/bin/docker
if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "check_deploy: starting dockerd"
  nohup dockerd >/var/log/dockerd-modelmora-ci.log 2>&1 &
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -30 /var/log/dockerd-modelmora-ci.log >&2; exit 1; }
fi

# the compose files parse (the single-server one is not started here)
for f in single.yml replicated.yml; do
  (cd deploy/compose && MODELMORA_ENV_FILE=modelmora.env.example docker-compose -f "$f" config -q)
done

deploy/docker/build.sh --tag modelmora:ci
t_built=$(date +%s)
# the compose stack's load balancer, from the same local base (Docker Hub's nginx is out of reach)
DOCKER_BUILDKIT=1 "$DOCKER" build -q --build-arg "BASE=$(cat build/docker/base)" \
  -f deploy/ci/nginx.Dockerfile -t modelmora-nginx:ci deploy/ci >/dev/null

MODELMORA_IMAGE=modelmora:ci MODELMORA_DOCKER="$DOCKER" MODELMORA_LB_IMAGE=modelmora-nginx:ci \
  python -m pytest tests/deploy -m container -p no:cacheprovider -q
# earlier builds of the image, untagged by this one
"$DOCKER" image prune -f --filter label=org.opencontainers.image.title=ModelMora >/dev/null
echo "check_deploy: image built in $((t_built - t0)) s, all deployment checks in $(($(date +%s) - t0)) s"
