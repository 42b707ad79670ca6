"""The baseline: a bare FastAPI JSON endpoint, served by uvicorn exactly as ``otpgate serve``
serves otpgate (default loop and HTTP implementation, i.e. uvloop and httptools when they are
installed; one worker; no access log; ``log_config=None``; lifespan on).

Run as ``python -m benchmarks.bare_app --port N`` (it always listens on 127.0.0.1).
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI
from pydantic import BaseModel


class EchoIn(BaseModel):
    service_id: str
    to: str


app = FastAPI(title="bare")


@app.post("/echo")
async def echo(body: EchoIn) -> dict[str, str]:
    """Parse and validate a small JSON body, answer a small JSON object."""
    return {"id": "echo", "to": body.to, "status": "ok"}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The same keyword arguments as otpgate.entrypoints.cli.serve.
    uvicorn.run(
        "benchmarks.bare_app:app",
        host="127.0.0.1",
        port=args.port,
        workers=1,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
