"""OpenAI's batch webhooks, sent by the local server when its simulation names a URL.

When a batch of the OpenAI face ends, an event (`batch.completed`, `batch.failed`,
`batch.expired` or `batch.cancelled`) is POSTed to `webhook_url`, signed as OpenAI signs
them (Standard Webhooks: `webhook-id`, `webhook-timestamp` and a `v1,` HMAC-SHA256 of
`id.timestamp.body` under the `whsec_` secret), so the `openai` SDK's
`client.webhooks.unwrap` verifies it. Events go from a thread of their own, each tried a
few times as OpenAI retries a failed delivery; a delivery that fails is logged, and
never holds a batch back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import queue
import threading
import time

import httpx

from localbatch.store import new_id, now

EVENTS = {"completed": "batch.completed", "failed": "batch.failed",
          "expired": "batch.expired", "cancelled": "batch.cancelled"}
ATTEMPTS = 3
RETRY_SECONDS = 1.0

log = logging.getLogger("localbatch")


def signed(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header of `body` under `secret` (`whsec_` + base64)."""
    key = (base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_")
           else secret.encode())
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(digest.digest()).decode()


class WebhookSender:
    def __init__(self, url: str, secret: str):
        self.url, self.secret = url, secret
        self._events: queue.Queue[dict | None] = queue.Queue()
        self._thread = threading.Thread(target=self._deliver, name="localbatch-webhooks",
                                        daemon=True)
        self._thread.start()

    def batch_ended(self, batch: dict) -> None:
        """Queue the event of a batch that has just ended."""
        self._events.put({"id": new_id("evt_", 12), "object": "event",
                          "type": EVENTS[batch["status"]], "created_at": now(),
                          "data": {"id": batch["id"]}})

    def close(self) -> None:
        """Deliver what is queued (each tried as usual), then stop."""
        self._events.put(None)
        self._thread.join(timeout=30)

    def _deliver(self) -> None:
        with httpx.Client(timeout=10) as http:
            while (event := self._events.get()) is not None:
                body = json.dumps(event)
                for attempt in range(ATTEMPTS):
                    timestamp = int(time.time())
                    try:
                        response = http.post(self.url, content=body, headers={
                            "content-type": "application/json", "webhook-id": event["id"],
                            "webhook-timestamp": str(timestamp),
                            "webhook-signature": signed(self.secret, event["id"], timestamp,
                                                        body)})
                        if response.is_success:
                            break
                        reason = f"HTTP {response.status_code}"
                    except httpx.HTTPError as exc:
                        reason = type(exc).__name__
                    log.warning("webhook %s for batch %s to %s failed (%s), attempt %d of %d",
                                event["type"], event["data"]["id"], self.url, reason,
                                attempt + 1, ATTEMPTS)
                    if attempt + 1 < ATTEMPTS:
                        time.sleep(RETRY_SECONDS * 2 ** attempt)
