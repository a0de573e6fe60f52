#!/bin/sh
# As the official image's entrypoint: a bare `redis-server ...` (no config file) runs with protected mode off,
# since the container network, not a loopback bind, is what keeps strangers out.
if [ "${1:-}" = redis-server ]; then
    set -- "$@" --protected-mode no
fi
exec "$@"
