"""`primasim serve`: the runtime as a long-running OpenAI-compatible server (engine, HTTP API,
load generator). The HTTP layer needs FastAPI, uvicorn and sse-starlette (installed with primasim)."""
