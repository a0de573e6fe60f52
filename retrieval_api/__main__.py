"""`python -m retrieval_api` (console script `hsnn-api`): serve the API with uvicorn.

Settings come from flags, `HSNN_API_*` environment variables and the "api" section of the file named by
`HSNN_CONFIG_FILE` (see retrieval_api/settings.py); `--help` lists them all. Example:

    HSNN_API_ITEMS_TOKEN=... hsnn-api --store-dir /var/lib/hsnn/snapshots --catalog planted:3000
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from clitools.allocator import reexec_under_jemalloc
from retrieval_api.app import create_app
from retrieval_api.connections import header_timeout_protocol
from retrieval_api.settings import ApiSettings


def main(argv: list[str] | None = None) -> None:
    settings = ApiSettings.from_cli(argv)
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)  # the event loop shares the GIL with scoring
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("hsnn.retrieval_api")
    if settings.store_dir is None or (settings.catalog is None and settings.redis_url is None):
        log.warning("no store_dir, or neither redis_url nor catalog: /retrieve answers 503 until a pair is loaded")
    if settings.items_token is None:
        log.info("HSNN_API_ITEMS_TOKEN is not set: POST /items/events is off")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        http=header_timeout_protocol(settings.header_timeout_s),  # slowloris: uvicorn has no header timeout
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # call_later takes a float
        access_log=False,  # one line per request costs more than the request at our rates; /metrics counts them
    )


if __name__ == "__main__":
    reexec_under_jemalloc()  # scoring a batch frees >32 MiB pair tensors: glibc would fault them in again each time
    main()
