# ModelMora server image, CPU build of torch (or a CUDA build: docs/deployment.md, "GPU"). Build it with deploy/docker/build.sh (docs/deployment.md):
# the script fills build/docker/wheels (the torch CPU wheel, and every other wheel unless --online),
# which the install step binds read-only, so no wheel, pip cache or CA certificate ends up in a layer.
#
# Any Debian bookworm base works: the official python image (the default), debian:bookworm-slim, or
# the local debootstrap base that build.sh makes where Docker Hub is out of reach.
ARG BASE=python:3.11-slim-bookworm

# ---- python: the base with a CPython 3.11 (the python image has one; plain Debian gets Debian's)
FROM ${BASE} AS python
SHELL ["/bin/bash", "-eo", "pipefail", "-c"]
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    fi

# ---- build: a virtual environment with modelmora[$EXTRAS]; only /opt/modelmora leaves this stage
FROM python AS build
SHELL ["/bin/bash", "-eo", "pipefail", "-c"]
# Debian splits ensurepip off into python3-venv; the python image has it built in.
RUN if ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    fi \
    && python3 -m venv /opt/modelmora
COPY deploy/docker/pip-install.sh /usr/local/bin/
COPY pyproject.toml /src/
# Empty: install from the wheels in build/docker/wheels only (air-gapped). Set (build.sh's default):
# that index, plus the torch wheel from build/docker/wheels; the CA bundle pip needs to reach it comes
# in as the BuildKit secret "pip_ca", mounted for the install steps only and never stored.
ARG PIP_INDEX_URL=""
# PostgreSQL and Redis for replicas (deploy/compose/replicated.yml); add s3 for s3:// installs, S3
# results and a model store in S3 (about 110 MB more), otel for trace export.
ARG EXTRAS=server,postgres,redis
# cpu, or the CUDA build whose wheel build.sh --torch-variant cu128 placed in the wheels (the CUDA
# libraries come as pip packages; the host's driver comes in through the NVIDIA container toolkit).
ARG TORCH_VARIANT=cpu
# The dependencies first, from pyproject.toml alone: a change to the sources or the README then
# rebuilds only the small step after this one.
RUN --mount=type=bind,source=build/docker/wheels,target=/wheels \
    --mount=type=secret,id=pip_ca \
    torch_wheel=$(find /wheels -maxdepth 1 -name 'torch-*.whl' | head -n 1); \
    if [ -z "$torch_wheel" ]; then \
        echo "no torch wheel in build/docker/wheels: build with deploy/docker/build.sh" >&2; exit 1; \
    fi; \
    python3 -c 'import sys, tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
        extras = [r for e in sys.argv[1].split(",") for r in p["optional-dependencies"][e]]; \
        print("\n".join(p["dependencies"] + extras))' "$EXTRAS" >/tmp/requirements.txt; \
    pip-install.sh "$torch_wheel" -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt; \
    /opt/modelmora/bin/python -c "import torch; cuda = torch.version.cuda; \
        assert (cuda is None) == ('$TORCH_VARIANT' == 'cpu'), f'torch {torch.__version__}, CUDA {cuda}'"
COPY README.md /src/
COPY src /src/src
RUN --mount=type=bind,source=build/docker/wheels,target=/wheels \
    --mount=type=secret,id=pip_ca \
    pip-install.sh --no-deps /src; \
    /opt/modelmora/bin/pip check

# ---- the image
FROM python
SHELL ["/bin/bash", "-eo", "pipefail", "-c"]
RUN groupadd --gid 10001 modelmora \
    && useradd --uid 10001 --gid 10001 --home-dir /data --no-create-home --no-log-init \
        --shell /usr/sbin/nologin modelmora \
    && install -d -o 10001 -g 10001 -m 0750 /data
COPY --from=build /opt/modelmora /opt/modelmora
# The server binds every interface (a container's loopback is unreachable from outside), which with
# the default auth.enabled=auto turns API keys on: give it MODELMORA_AUTH__BOOTSTRAP_KEY (>= 32 chars).
ENV PATH=/opt/modelmora/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/data \
    HF_HOME=/data/huggingface \
    MODELMORA_SERVER__HOST=0.0.0.0 \
    MODELMORA_SERVER__DATA_DIR=/data \
    MODELMORA_SERVER__LOG_FORMAT=json
# The registry database, model copies, jobs.db and results; a modelmora.yaml here is read at start.
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8000 50051
# Ready, not just alive: 503 while starting and while draining (docs/deployment.md).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('MODELMORA_SERVER__PORT', '8000'), timeout=4)"]
# Exec form: the server is PID 1 and gets SIGTERM itself (the first drains, a second stops at once).
ENTRYPOINT ["modelmora"]
CMD ["serve"]

ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
ARG BASE
LABEL org.opencontainers.image.title="ModelMora" \
      org.opencontainers.image.description="One server for many PyTorch models (CPU build of torch)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}" \
      org.opencontainers.image.documentation="docs/deployment.md"
