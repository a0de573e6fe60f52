# syntax=docker/dockerfile:1
# One image for every HSNN-Serve service; the command picks the service:
#   hsnn-trainer | hsnn-indexer | hsnn-api | hsnn-feed --kafka-bootstrap-servers ... --rate ... | hsnn-ops ...
# Build: docker build -t hsnn-serve:dev .
# CPU-only image (no CUDA libraries; about 1 GB instead of 5): torch from the PyTorch CPU wheel index:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t hsnn-serve:cpu .
# BASE_IMAGE: any Debian-based image with Python 3.11 as `python` (scripts/compose_smoke.sh builds one
# from Debian packages where Docker Hub cannot be reached).
ARG BASE_IMAGE=python:3.11-slim

# ---- build stage: resolve and install dependencies into a virtual environment ----
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first (torch from PyPI is the big layer): install the project's metadata with empty
# packages so this layer is reused until pyproject.toml changes.
COPY pyproject.toml README.md LICENSE ./
RUN for pkg in hsnn clitools streaming worlds hsnn_ops hsnn_client trainer indexer retrieval_api devservers bench feed; do \
        mkdir -p "$pkg" && touch "$pkg/__init__.py"; \
    done \
    && pip install --upgrade pip \
    && if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch; fi \
    && pip install ".[serve]" \
    && pip uninstall -y hsnn-serve

# Then the sources; --no-deps so nothing is resolved again.
COPY hsnn ./hsnn
COPY clitools ./clitools
COPY streaming ./streaming
COPY worlds ./worlds
COPY hsnn_ops ./hsnn_ops
COPY hsnn_client ./hsnn_client
COPY trainer ./trainer
COPY indexer ./indexer
COPY retrieval_api ./retrieval_api
COPY devservers ./devservers
COPY bench ./bench
COPY feed ./feed
RUN pip install --no-deps . \
    && python -c "import hsnn, clitools, streaming, worlds, hsnn_ops, hsnn_client, trainer, indexer, retrieval_api, feed, fastapi" \
    && hsnn-api --help > /dev/null

# ---- runtime stage: the venv, no build tools, a non-root user ----
FROM ${BASE_IMAGE} AS runtime

ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "${GID}" hsnn \
    && useradd --system --uid "${UID}" --gid hsnn --home-dir /home/hsnn --create-home --shell /usr/sbin/nologin hsnn \
    && mkdir -p /var/lib/hsnn/snapshots \
    && chown -R hsnn:hsnn /var/lib/hsnn

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    HSNN_TRAINER_STORE_DIR=/var/lib/hsnn/snapshots \
    HSNN_INDEXER_STORE_DIR=/var/lib/hsnn/snapshots \
    HSNN_API_STORE_DIR=/var/lib/hsnn/snapshots

WORKDIR /home/hsnn
USER hsnn:hsnn

# The snapshot store; compose and k8s mount a shared volume here.
VOLUME ["/var/lib/hsnn/snapshots"]
EXPOSE 8000 9102 9103

# No default service-specific healthcheck: compose and k8s define one per service.
CMD ["hsnn-api"]
