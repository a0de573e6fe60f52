# Stand-in for python:3.11-slim where Docker Hub cannot be reached: Debian bookworm's own Python 3.11.
# It trusts the CA bundle of the host that builds it (host-ca-certificates.crt, copied in by compose_smoke.sh),
# so pip inside image builds gets through the same TLS-inspecting proxy the host's pip does.
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && rm -rf /var/lib/apt/lists/*
COPY host-ca-certificates.crt /etc/ssl/certs/host-ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/host-ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca-certificates.crt
