"""retrieval_api: FastAPI service answering POST /retrieve with layer-wise HSNN scoring (see the API issue)."""
