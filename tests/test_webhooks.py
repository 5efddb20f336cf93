"""OpenAI's batch webhooks as localbatch sends them: signed so that the `openai` SDK's
own `webhooks.unwrap` verifies them, one event a batch of the OpenAI face when it ends.
(A webhook waking a suspended run through `enrichflow webhooks`, with a real Prefect
server and worker: tests/test_deployments.py.)"""

from __future__ import annotations

import base64
import io
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from conftest import sdk_client

from localbatch import Simulation

SECRET = "whsec_" + base64.b64encode(b"a-secret-of-the-test").decode()


@pytest.fixture
def receiver():
    """A webhook endpoint on loopback that keeps what it is sent: (url, deliveries)."""
    deliveries: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["content-length"]))
            deliveries.put((body, dict(self.headers)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", deliveries
    server.shutdown()


def one_batch(client: openai.OpenAI) -> str:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}
    upload = client.files.create(file=io.BytesIO(json.dumps(line).encode()), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def test_an_ended_batch_sends_one_signed_event_the_sdk_verifies(start_localbatch, receiver):
    url, deliveries = receiver
    server = start_localbatch(Simulation(webhook_url=url, webhook_secret=SECRET))
    client = sdk_client(server.base_url)
    batch_id = one_batch(client)
    body, headers = deliveries.get(timeout=30)
    event = openai.OpenAI(api_key="x", webhook_secret=SECRET).webhooks.unwrap(body, headers)
    assert event.type == "batch.completed" and event.data.id == batch_id
    assert client.batches.retrieve(batch_id).status == "completed"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="x", webhook_secret="whsec_" + base64.b64encode(
            b"another").decode()).webhooks.unwrap(body, headers)
    time.sleep(1)
    assert deliveries.empty(), "one event a batch"


def test_a_cancelled_batch_sends_batch_cancelled(start_localbatch, receiver):
    url, deliveries = receiver
    server = start_localbatch(Simulation(validating_seconds=60, webhook_url=url,
                                         webhook_secret=SECRET))
    client = sdk_client(server.base_url)
    batch_id = one_batch(client)
    client.batches.cancel(batch_id)
    body, headers = deliveries.get(timeout=30)
    event = openai.OpenAI(api_key="x", webhook_secret=SECRET).webhooks.unwrap(body, headers)
    assert (event.type, event.data.id) == ("batch.cancelled", batch_id)


def test_a_webhook_url_needs_its_secret():
    with pytest.raises(ValueError, match="webhook_secret"):
        Simulation(webhook_url="http://127.0.0.1:9/hook")
