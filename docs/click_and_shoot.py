"""Screenshot a page of the Prefect UI after clicking the elements with the given texts, in
turn (headless Chromium through its DevTools protocol): the flow run page opens its
Artifacts and Details tabs only by a click, the state message its whole text by "See More",
and the run form is submitted by its Submit button.

    python docs/click_and_shoot.py URL OUT.png TEXT [TEXT ...]
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time

import httpx
import websockets

PORT = 9333
CLICK = """[...document.querySelectorAll('*')]
  .find(e => e.children.length === 0 && e.textContent.trim() === %s)?.click()"""


async def shoot(url: str, out: str, *texts: str) -> None:
    profile = tempfile.mkdtemp()
    chromium = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--remote-debugging-port={PORT}", f"--user-data-dir={profile}",
         "--window-size=1600,1150", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                pages = httpx.get(f"http://127.0.0.1:{PORT}/json").json()
                page = next(p for p in pages if p["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as cdp:
            calls = iter(range(1, 1000))

            async def call(method: str, **params):
                number = next(calls)
                await cdp.send(json.dumps({"id": number, "method": method, "params": params}))
                while True:
                    answer = json.loads(await cdp.recv())
                    if answer.get("id") == number:
                        return answer.get("result", {})

            await asyncio.sleep(8)  # the UI loads the page
            for text in texts:
                await call("Runtime.evaluate", expression=CLICK % json.dumps(text))
                await asyncio.sleep(4)
            shot = await call("Page.captureScreenshot", format="png")
        with open(out, "wb") as handle:
            handle.write(base64.b64decode(shot["data"]))
    finally:
        chromium.terminate()
        chromium.wait()


if __name__ == "__main__":
    asyncio.run(shoot(*sys.argv[1:]))
