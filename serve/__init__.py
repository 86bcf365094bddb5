"""`scan-deploy serve`: the retriever behind an HTTP JSON API with a results page (the `serve`
extra: FastAPI, uvicorn, prometheus-client)."""
