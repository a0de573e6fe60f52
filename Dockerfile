# syntax=docker/dockerfile:1
# One image for every HSNN-Serve service; the command picks the service:
#   python -m trainer | python -m indexer | python -m retrieval_api | python -m feed --bootstrap ... --rate ...
# Build: docker build -t hsnn-serve:dev .

# ---- build stage: resolve and install dependencies into a virtual environment ----
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first (torch from PyPI is the big layer): install the project's metadata with empty
# packages so this layer is reused until pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN for pkg in hsnn trainer publisher indexer retrieval_api devservers bench feed; do \
        mkdir -p "$pkg" && touch "$pkg/__init__.py"; \
    done \
    && pip install --upgrade pip \
    && pip install . \
    && pip uninstall -y hsnn-serve

# Then the sources; --no-deps so nothing is resolved again.
COPY hsnn ./hsnn
COPY trainer ./trainer
COPY publisher ./publisher
COPY indexer ./indexer
COPY retrieval_api ./retrieval_api
COPY devservers ./devservers
COPY bench ./bench
COPY feed ./feed
RUN pip install --no-deps . && python -c "import hsnn, trainer, indexer, publisher, retrieval_api, feed"

# ---- runtime stage: the venv, no build tools, a non-root user ----
FROM python:3.11-slim AS runtime

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
CMD ["python", "-m", "retrieval_api"]
