# Stand-in for prom/prometheus: Debian's prometheus (2.42), same entrypoint shape, wget for the healthcheck.
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus /etc/prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
