"""Tokens and money: what a job will cost before it runs, and what each row did cost.

Prompt tokens are counted with the model's real tokenizer, offline (`bpe-openai` carries
OpenAI's encodings), plus the chat overhead OpenAI documents: 3 tokens per message, its
role, 1 more for a `name`, and 3 to prime the reply. The JSON schema of `response_format`
is not counted: OpenAI does not publish how it is injected. Images are counted with
OpenAI's published rules by model and `detail`; a remote image, whose size is unknown
before the provider fetches it, is counted as 1024 x 1024.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

import enrichflow
from enrichflow.config import PriceOverride, RequestConfig
from enrichflow.errors import InputError
from enrichflow.tasks.budget import MARGIN
from enrichflow.tasks.load import KEY
from enrichflow.tasks.render import LINE, USER_TEXT

if TYPE_CHECKING:
    import bpe_openai

REMOTE_IMAGE_SIZE = (1024, 1024)
# (base, per 512-px tile) for models priced by tiles; the first matching prefix wins.
TILE_RULES = [("gpt-4o-mini", 2833, 5667), ("gpt-5", 70, 140), ("o1", 75, 150),
              ("o3", 75, 150), ("gpt-4o", 85, 170), ("gpt-4.1", 85, 170), ("gpt-4.5", 85, 170)]
# multiplier for models priced by 32-px patches (at most 1536 patches)
PATCH_RULES = [("gpt-4.1-mini", 1.62), ("gpt-4.1-nano", 2.46), ("o4-mini", 1.72)]


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    batch_input: float
    batch_output: float
    source: str

    def batch_cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.batch_input + completion_tokens * self.batch_output) / 1e6

    def sync_cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


PRICES_STALE_DAYS = 90  # the shipped table's age past which the estimate warns
SNAPSHOT_DATE = re.compile(r"-\d{4}-\d{2}-\d{2}$")


@cache
def price_table() -> dict[str, Any]:
    return json.loads((Path(enrichflow.__file__).parent / "prices.json").read_text())


def _table_entry(model: str) -> dict[str, Any] | None:
    """The model's entry: its own name, or a dated snapshot of it (`gpt-4o-2024-08-06`);
    no other prefix, so that a typo (`gpt-4o-mnii`) is unknown, not priced as gpt-4o."""
    return price_table()["models"].get(SNAPSHOT_DATE.sub("", model))


def price_for(model: str, override: PriceOverride | None) -> Price | None:
    """The job's price: its override, else the shipped table; None when unknown."""
    if override is not None:
        return Price(override.input, override.output,
                     override.batch_input if override.batch_input is not None
                     else override.input / 2,
                     override.batch_output if override.batch_output is not None
                     else override.output / 2, "the job file")
    entry = _table_entry(model)
    if entry is None:
        return None
    checked = price_table()["checked"]
    age = (date.today() - date.fromisoformat(checked)).days
    return Price(entry["input"], entry["output"], entry["batch_input"], entry["batch_output"],
                 f"enrichflow's table, checked {checked}" + (
                     f" ({age} days ago: prices may have changed since; check the provider's "
                     "pricing page, or set `price` in the job file)"
                     if age > PRICES_STALE_DAYS else ""))


def offers_flex(model: str) -> bool:
    """Whether OpenAI's flex tier (synchronous answers at batch prices) serves `model`."""
    entry = _table_entry(model)
    return bool(entry and entry.get("flex"))


def default_token_budget(model: str) -> int | None:
    """OpenAI's tier-1 enqueued-token limit for the model, when the table knows it."""
    entry = _table_entry(model)
    return entry.get("tier1_enqueued_tokens") if entry else None


@cache
def _encoding(model: str) -> bpe_openai.Encoding:
    import bpe_openai  # a second to load: only when tokens are counted

    try:
        return bpe_openai.encoding_for_model(model)
    except Exception:  # unknown model names: today's OpenAI chat models use o200k_base
        return bpe_openai.get_encoding("o200k_base")


def image_tokens(model: str, width: int, height: int, detail: str) -> int:
    """OpenAI's published image token rule for `model` (tiles or patches)."""
    for prefix, multiplier in PATCH_RULES:
        if model.startswith(prefix):
            patches = math.ceil(width / 32) * math.ceil(height / 32)
            if patches > 1536:
                shrink = math.sqrt(32 * 32 * 1536 / (width * height))
                shrink *= min(math.floor(width * shrink / 32) / (width * shrink / 32),
                              math.floor(height * shrink / 32) / (height * shrink / 32))
                patches = min(1536, math.ceil(width * shrink / 32) *
                              math.ceil(height * shrink / 32))
            return math.ceil(patches * multiplier)
    base, tile = next(((b, t) for p, b, t in TILE_RULES if model.startswith(p)), (85, 170))
    if detail == "low":
        return base
    if max(width, height) > 2048:
        scale = 2048 / max(width, height)
        width, height = width * scale, height * scale
    if min(width, height) > 768:
        scale = 768 / min(width, height)
        width, height = width * scale, height * scale
    return base + tile * math.ceil(width / 512) * math.ceil(height / 512)


def _image_size(url: str) -> tuple[int, int]:
    if not url.startswith("data:"):
        return REMOTE_IMAGE_SIZE
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        return image.size


def chat_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of one Chat Completions or Responses body (see the module's rule)."""
    model = body["model"]
    encode = _encoding(model).encode_ordinary  # special-token text in a cell is text
    total = 3
    for message in _messages(body):
        total += 3 + len(encode(message.get("role", "")))
        if message.get("name"):
            total += 1 + len(encode(message["name"]))
        content = message.get("content")
        if isinstance(content, str):
            total += len(encode(content))
            continue
        for part in content or []:
            if part.get("type") in ("text", "input_text"):
                total += len(encode(part["text"]))
            elif part.get("type") == "image_url":
                image = part["image_url"]
                total += image_tokens(model, *_image_size(image["url"]),
                                      image.get("detail", "auto"))
            elif part.get("type") == "input_image":
                total += image_tokens(model, *_image_size(part["image_url"]),
                                      part.get("detail", "auto"))
    return total


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A body's messages, in Chat Completions' shape: a Responses body's instructions are
    its system message, its input the messages after it."""
    if "messages" in body:
        return body["messages"]
    messages = [{"role": "system", "content": body["instructions"]}] \
        if body.get("instructions") else []
    items = body.get("input")
    return messages + ([{"role": "user", "content": items}] if isinstance(items, str) else items)


def request_tokens(requests: pa.Table, request: RequestConfig,
                   dataset_name: str = "the dataset") -> np.ndarray:
    """Estimated prompt tokens of each rendered request: for a text template, what every
    request shares (the system prompt, the roles, the overhead) counted once and each
    row's user message; else each line's whole body. Both count exactly as
    `chat_prompt_tokens` does. An embedding's input is counted as it is, with no
    overhead. A text too long to count is an InputError naming its row."""
    try:
        return _request_tokens(requests, request)
    except ValueError as exc:
        if str(exc) != TOO_LONG_TO_COUNT:
            raise
        key = requests[KEY][_first_too_long(requests)].as_py()
        raise InputError(
            f"{dataset_name}: row {key!r}: its prompt holds a text of "
            f"{TOKENIZER_MAX_CHARS:,} characters or more (from "
            f"{', '.join(request.text_columns())}), more than the tokenizer counts and than "
            "any model reads in one request; shorten that cell, or leave the row out of the "
            "dataset") from exc


TOO_LONG_TO_COUNT = "Input too long to encode safely"  # bpe-openai's refusal of a text...
TOKENIZER_MAX_CHARS = 1_000_000  # ...of this many characters or more


def _first_too_long(requests: pa.Table) -> int:
    """The position of the first request with a text too long to count."""
    if USER_TEXT in requests.column_names:
        return pc.index(pc.greater_equal(pc.utf8_length(requests[USER_TEXT]),
                                         TOKENIZER_MAX_CHARS), True).as_py()
    return next(index for index, line in enumerate(requests[LINE].to_pylist())
                if not _countable(json.loads(line)["body"]))


def _countable(body: dict[str, Any]) -> bool:
    try:
        chat_prompt_tokens(body)
    except ValueError:
        return False
    return True


def _request_tokens(requests: pa.Table, request: RequestConfig) -> np.ndarray:
    if USER_TEXT not in requests.column_names:
        return np.array([chat_prompt_tokens(json.loads(line)["body"])
                         for line in requests[LINE].to_pylist()], dtype=np.int64)
    encode = _encoding(request.model).encode_ordinary
    texts = np.fromiter((len(encode(text)) for text in requests[USER_TEXT].to_pylist()),
                        dtype=np.int64, count=requests.num_rows)
    if request.embeddings:
        return texts
    shared = {"model": request.model, "messages": [{"role": "user", "content": ""}]}
    if request.system:
        shared["messages"].insert(0, {"role": "system", "content": request.system})
    return texts + chat_prompt_tokens(shared)


@dataclass(frozen=True)
class Estimate:
    model: str
    rows: int
    not_sent: int  # skipped or failed before sending
    reused: int
    requests: int
    shards: int
    input_tokens: int
    output_ceiling: int | None  # None: no max_tokens, so no ceiling
    price: Price | None
    already_sent: int = 0  # requests sent by the run this one resumes
    sync_canary: int = 0  # of the requests, those a synchronous canary answers
    measured_output: tuple[float, int] | None = None  # output tokens a request, as the
    # canary's answers averaged, and how many answers
    token_limit: int | None = None  # the enqueued-token limit the shards are planned under
    queue: tuple[int, int] | None = None  # (tokens held, limit) of the organisation's
    # ledger now, on a shared Prefect server
    turnaround: tuple[float, int] | None = None  # the median seconds a batch of this
    # account and model took, and of how many batches
    deadline: datetime | None = None  # the job's
    deadline_lead: float = 0.0  # seconds before it that the synchronous API takes over

    def likely(self) -> float | None:
        """The cost at batch prices with the output the canary measured."""
        if self.price is None or self.measured_output is None:
            return None
        return self._batch_cost(self.input_tokens, self.measured_output[0] * self.requests)

    def batch_range(self) -> tuple[float, float | None] | None:
        """At batch prices, but the synchronous canary's share at synchronous prices."""
        return self._range(self._batch_cost) if self.price else None

    def _batch_cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        share = self.sync_canary / self.requests if self.requests else 0.0
        return (self.price.batch_cost(prompt_tokens, completion_tokens) * (1 - share)
                + self.price.sync_cost(prompt_tokens, completion_tokens) * share)

    def sync_range(self) -> tuple[float, float | None] | None:
        return self._range(self.price.sync_cost) if self.price else None

    def _range(self, cost) -> tuple[float, float | None]:
        high = None if self.output_ceiling is None else cost(self.input_tokens,
                                                             self.output_ceiling)
        return cost(self.input_tokens, 0), high

    def lines(self) -> list[tuple[str, str]]:
        """(label, value) pairs, for the terminal and for the Prefect artifact."""
        ceiling = (f"{self.output_ceiling:,}" if self.output_ceiling is not None
                   else "no ceiling (set request.max_tokens)")
        pairs = [("model", self.model), ("rows", f"{self.rows:,}"),
                 ("not sent (skipped or bad input)", f"{self.not_sent:,}"),
                 ("answers reused from earlier runs", f"{self.reused:,}"),
                 *([("already sent by the run this one resumes", f"{self.already_sent:,}")]
                   if self.already_sent else []),
                 ("requests to send", f"{self.requests:,}"), ("shards", f"{self.shards:,}"),
                 ("input tokens", f"{self.input_tokens:,}" + _approximation(self.model)),
                 ("output token ceiling", ceiling), *self.forecast()]
        if self.price is None:
            pairs.append(("cost", f"unknown: no price for {self.model}; set `price` in the "
                                  "job file"))
            return pairs
        if self.sync_canary:
            pairs.append(("canary", f"{self.sync_canary} of the requests, answered first at "
                                    "synchronous prices (counted so below)"))
        pairs += [("cost at batch prices", _money(self.batch_range())),
                  ("likely cost at batch prices", self.likely_text()),
                  ("same requests at synchronous prices", _money(self.sync_range())),
                  ("prices from", self.price.source)]
        return pairs

    def forecast(self) -> list[tuple[str, str]]:
        """Waves at the enqueued-token limit, what the queue holds now, when the job is
        likely done, from the turnaround of earlier batches, and whether in time."""
        if not self.requests:
            return []
        lines = self._queue_forecast() if self.token_limit is not None else []
        if self.deadline is not None:
            lines.append(("deadline", self._deadline_forecast()))
        return lines

    def _waves(self) -> int:
        if self.token_limit is None:  # no limit holds shards back
            return 1
        held, limit = self.queue or (0, self.token_limit)  # the ledger's limit, if any
        return math.ceil((self.input_tokens / (1 - MARGIN) + held) / limit)

    def _deadline_forecast(self) -> str:
        left = self.deadline.timestamp() - self.deadline_lead - time.time()
        said = (f"{self.deadline.isoformat(timespec='minutes')}: the rows not answered "
                f"{duration(self.deadline_lead)} before it go through the synchronous API")
        if left <= 0:
            return f"{said}, which is now: every row does"
        if not self.turnaround:
            return (f"{said}, in {duration(left)}; whether the batches end by then is "
                    "unknown (no turnaround of this account and model yet)")
        likely = self._waves() * self.turnaround[0]
        verdict = "likely in time" if likely <= left else "likely not in time"
        return f"{said}, in {duration(left)}: {verdict} (done in about {duration(likely)})"

    def _queue_forecast(self) -> list[tuple[str, str]]:
        held, limit = self.queue or (0, self.token_limit)  # the ledger's limit, if any
        waves = self._waves()
        queue = (f"{int(held * (1 - MARGIN)):,} tokens of unfinished batches, of a limit of "
                 f"{limit:,}" if self.queue else
                 "unknown: no Prefect server (PREFECT_API_URL) keeps the organisation's ledger")
        worst = f"a batch may take up to 24 h, so at worst {duration(waves * 24 * 3600)}"
        if self.turnaround:
            seconds, batches = self.turnaround
            likely = (f"in about {duration(waves * seconds)}: {waves} wave(s) of "
                      f"{duration(seconds)}, the median of the last {batches} batch(es) of "
                      "this account and model")
        elif self.queue:
            likely = f"unknown: no batch of this account and model has ended yet; {worst}"
        else:
            likely = f"unknown: no Prefect server keeps the batches' turnaround; {worst}"
        return [("waves at the enqueued-token limit", f"{waves} ({limit:,} tokens a wave, "
                 f"less the {MARGIN:.0%} margin)"), ("in the queue now", queue),
                ("likely done", likely)]

    def likely_text(self) -> str:
        likely = self.likely()
        if self.price is None:
            return f"unknown: no price for {self.model}"
        if likely is None:
            return ("not measured yet: `enrichflow run JOB --canary-only` answers a sample "
                    "and measures the output")
        tokens, answers = self.measured_output
        return (f"{usd(likely)} (output of {tokens:,.0f} tokens a request, as the canary's "
                f"{answers} answers averaged)")

    def text(self) -> str:
        lines = self.lines()
        width = max(len(label) for label, _ in lines)
        return "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in lines)

    def markdown(self) -> str:
        rows = "\n".join(f"| {label} | {value} |" for label, value in self.lines())
        return f"| what | estimate |\n| --- | --- |\n{rows}\n"

    def _repr_html_(self) -> str:
        """The estimate as a table in Jupyter."""
        import pandas as pd

        return pd.DataFrame(self.lines(), columns=["what", "estimate"]).to_html(index=False)

    def __str__(self) -> str:
        return self.text()


def estimate_error(estimate: Estimate, prompt_tokens: int,
                   cost_usd: float | None) -> dict[str, Any] | None:
    """How far a run's estimate was from what its requests were billed (all attempts,
    the canary's included): for the manifest, and for whoever sets the next cap."""
    if not estimate.requests:
        return None
    error: dict[str, Any] = {"prompt_tokens": {
        "estimated": estimate.input_tokens, "billed": prompt_tokens,
        "error": _relative(prompt_tokens, estimate.input_tokens)}}
    span = estimate.batch_range()
    if span is not None and cost_usd is not None:
        likely = estimate.likely()
        error["cost_usd"] = {"low": span[0], "high": span[1], "likely": likely,
                             "billed": cost_usd,
                             "error_vs_likely": None if likely is None
                             else _relative(cost_usd, likely)}
    return error


def estimate_error_text(error: dict[str, Any]) -> str:
    """`estimate_error` in words."""
    tokens = error["prompt_tokens"]
    words = f"{tokens['billed']:,} prompt tokens billed: " + (
        f"{_off(tokens['error'])} the estimated {tokens['estimated']:,}"
        if tokens["error"] is not None else "none were estimated")
    cost = error.get("cost_usd")
    if cost:
        low, high, billed = cost["low"], cost["high"], cost["billed"]
        where = ("below" if billed < low else
                 "above" if high is not None and billed > high else "within")
        words += f"; cost {usd(billed)}: {where} the estimated {_money((low, high))}"
        if cost["error_vs_likely"] is not None:
            words += f", {_off(cost['error_vs_likely'])} the likely {usd(cost['likely'])}"
    return words


def deadline_text(deadline: dict[str, Any]) -> str:
    """A run's manifest `deadline` in words."""
    if not deadline["rows_sent_now"]:
        return f"{deadline['at']}: every row went through the batches in time"
    cost = "unknown" if deadline["cost_usd"] is None else usd(deadline["cost_usd"])
    return (f"{deadline['at']}: {deadline['rows_sent_now']:,} rows taken out of their "
            f"batches and sent through the synchronous API, for {cost} (in the cost)")


def _relative(actual: float, estimated: float) -> float | None:
    return (actual - estimated) / estimated if estimated else None


def _off(error: float) -> str:
    return f"{abs(error):.1%} " + ("above" if error > 0 else "below" if error < 0 else "off")


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def _money(span: tuple[float, float | None]) -> str:
    low, high = span
    if high is None:
        return f"{usd(low)} and up"
    return f"{usd(low)} to {usd(high)}" if high != low else usd(low)


def usd(amount: float) -> str:
    """Dollars to four decimals, or to two significant digits below that: a cap of
    $0.000001 reads as itself, not as $0.0000."""
    if amount == 0 or abs(amount) >= 0.0001:
        return f"${amount:,.4f}"
    return f"${amount:.{1 - math.floor(math.log10(abs(amount)))}f}"


def _approximation(model: str) -> str:
    """Said of a token count made with OpenAI's tokenizer for another's model."""
    maker = "Anthropic" if model.startswith("claude") else (
        "Google" if model.startswith("gemini") else None)
    if maker is None:
        return ""
    return (f" (approximated offline with OpenAI's o200k tokenizer: {maker}'s own count "
            "differs)")
