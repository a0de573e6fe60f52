"""`python -m retrieval_api`: serve the API with uvicorn.

Settings come from `HSNN_API_*` environment variables and the "api" section of the file named by
`HSNN_CONFIG_FILE` (see retrieval_api/settings.py); the flags below override them. Example:

    HSNN_API_ITEMS_TOKEN=... python -m retrieval_api --store-dir /var/lib/hsnn/snapshots --catalog planted:3000
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from retrieval_api.app import create_app
from retrieval_api.settings import ApiSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrieval_api", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="listen address (HSNN_API_HOST)")
    parser.add_argument("--port", type=int, help="listen port (HSNN_API_PORT)")
    parser.add_argument("--store-dir", help="snapshot store root to follow (HSNN_API_STORE_DIR)")
    parser.add_argument("--catalog", help='"planted:N[:SEED]" or a .safetensors catalogue (HSNN_API_CATALOG)')
    parser.add_argument("--kafka-bootstrap-servers", help="brokers for item events (HSNN_API_KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    overrides = {
        name: value for name, value in vars(args).items() if name in ApiSettings.model_fields and value is not None
    }
    settings = ApiSettings(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.store_dir is None or settings.catalog is None:
        logging.getLogger("hsnn.retrieval_api").warning(
            "no store_dir/catalog: the API will answer 503 on /retrieve until a pair is loaded"
        )
    if settings.items_token is None:
        logging.getLogger("hsnn.retrieval_api").info("HSNN_API_ITEMS_TOKEN is not set: POST /items/events is off")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
