"""Webhook wake-up: OpenAI's batch events resume the suspended run waiting for that batch
within seconds, instead of at the next pass of the resume-ready schedule (which stays,
as the fallback for an event that is lost).

`enrichflow webhooks` serves `POST /webhooks/openai` (register its public address in
OpenAI's dashboard for the `batch.*` events). Each event's signature is verified with
the `openai` SDK against OPENAI_WEBHOOK_SECRET before anything is done; the runs it
resumes are found in the Prefect server of PREFECT_API_URL by their journals.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from openai import InvalidWebhookSignatureError, OpenAI
from starlette.concurrency import run_in_threadpool

from enrichflow.errors import ConfigError

PATH = "/webhooks/openai"
SECRET_ENV = "OPENAI_WEBHOOK_SECRET"

log = logging.getLogger(__name__)


def create_app(secret: str) -> FastAPI:
    from enrichflow.flows.resume import resume_runs_waiting_for

    verifier = OpenAI(api_key="unused: only verifies signatures", webhook_secret=secret)
    app = FastAPI(title="enrichflow webhooks", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.post(PATH)
    async def batch_event(request: Request):
        payload = await request.body()
        try:
            event = verifier.webhooks.unwrap(payload, request.headers)
        except (InvalidWebhookSignatureError, ValueError) as exc:
            log.warning("refused a webhook: %s", exc)
            return JSONResponse({"error": str(exc)}, status_code=400)
        if not event.type.startswith("batch."):
            return {"resumed": []}
        resumed = await run_in_threadpool(resume_runs_waiting_for, event.data.id)
        log.info("%s %s: %d suspended run(s) resumed", event.type, event.data.id,
                 len(resumed))
        return {"resumed": resumed}

    return app


def serve(host: str, port: int, secret: str | None) -> None:
    import uvicorn

    if not secret:
        raise ConfigError(f"{SECRET_ENV} is not set: give it the signing secret of the "
                          "webhook endpoint (whsec_…) from OpenAI's dashboard")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(f"enrichflow receives OpenAI's batch webhooks at http://{host}:{port}{PATH}",
          flush=True)
    uvicorn.run(create_app(secret), host=host, port=port, log_level="warning")
