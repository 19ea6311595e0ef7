# The load balancer of deploy/compose/replicated.yml for a machine without Docker Hub (the check in
# deploy/ci/check_deploy.sh): Debian's nginx on the same local bookworm base as the server's image.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
SHELL ["/bin/bash", "-eo", "pipefail", "-c"]
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
CMD ["nginx", "-g", "daemon off;"]
