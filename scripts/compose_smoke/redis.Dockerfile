# Stand-in for the official redis image: Debian's redis-server (7.0) and redis-cli, with the official
# entrypoint's rule (protected mode off for a bare `redis-server ...`).
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data
COPY redis-start.sh /usr/local/bin/redis-start.sh
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/redis-start.sh"]
CMD ["redis-server"]
