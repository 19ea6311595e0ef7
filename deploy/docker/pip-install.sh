#!/bin/sh
# `pip install` into /opt/modelmora, for the Dockerfile's build stage: the wheels bound at /wheels,
# the index PIP_INDEX_URL (none when empty: the wheels only), and the CA bundle of the BuildKit secret
# pip_ca when one was given. No cache: nothing of this is left in a layer.
set -eu
index=--no-index
if [ -n "${PIP_INDEX_URL:-}" ]; then index="--index-url=$PIP_INDEX_URL"; fi
if [ -s /run/secrets/pip_ca ]; then
  PIP_CERT=/run/secrets/pip_ca
  export PIP_CERT
fi
exec /opt/modelmora/bin/pip install --no-cache-dir --disable-pip-version-check --progress-bar off \
  "$index" --find-links /wheels "$@"
