"""The job file: a Pydantic model of the YAML, validated before anything is read or sent.

Every error names the file, the field and what is allowed, so that a typo costs a
second, not a batch. Relative paths are relative to the directory the job runs from.
"""

from __future__ import annotations

import codecs
import copy
import difflib
import hashlib
import json
import string
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from enrichflow.errors import ConfigError
from localbatch.engines import EMBEDDING_DIMENSIONS, FIXED_DIMENSIONS
from localbatch.simulation import MAX_BATCH_FILE_BYTES, MAX_REQUESTS_PER_BATCH

SECRET_OPTION_WORDS = ("key", "secret", "token", "password", "credential")
CHAT_ENDPOINT, RESPONSES_ENDPOINT, EMBEDDINGS_ENDPOINT = \
    "/v1/chat/completions", "/v1/responses", "/v1/embeddings"
# Parameters of a request that generates text, which an embeddings request does not take.
GENERATION_FIELDS = ("system", "user", "temperature", "top_p", "max_tokens",
                     "max_completion_tokens", "seed")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DatasetConfig(_Strict):
    path: str = Field(description="Local path, s3:// or https:// URI of the rows.")
    format: Literal["csv", "parquet", "jsonl"] | None = Field(
        default=None, description="Read as this format; default: from the file's extension.")
    id_column: str | None = Field(
        default=None, description="Column whose values identify rows; default: row number.")
    limit: int | None = Field(default=None, gt=0, description="Use only the first N rows.")
    encoding: str = Field(default="utf-8", description="Text encoding of a CSV or JSONL file, "
                                                       "e.g. latin-1 or cp1252.")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        try:
            return codecs.lookup(encoding).name
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r}; e.g. utf-8, latin-1, "
                             "cp1252") from None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = Field(default="answer", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool = True

    @model_validator(mode="after")
    def _schema_fits_type(self) -> ResponseFormat:
        if self.type != "json_schema":
            if self.schema_ is not None:
                raise ValueError("a schema is only used with type json_schema")
            return self
        if self.schema_ is None:
            raise ValueError("type json_schema needs a schema")
        try:
            Draft202012Validator.check_schema(self.schema_)
        except SchemaError as exc:
            where = ".".join(str(part) for part in exc.path) or "its top level"
            raise ValueError(f"the schema is not valid JSON Schema at {where}: "
                             f"{exc.message}") from exc
        if self.schema_.get("type") != "object" or not self.schema_.get("properties"):
            raise ValueError("the schema must be an object with properties (they become "
                             "the output's columns)")
        return self

    def api_value(self) -> dict[str, Any] | None:
        """The `response_format` parameter as Chat Completions takes it."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema",
                "json_schema": {"name": self.name, "strict": self.strict, "schema": self.schema_}}

    def responses_value(self) -> dict[str, Any] | None:
        """The `text.format` parameter as the Responses API takes it."""
        if self.type == "json_schema":
            return {"type": "json_schema", "name": self.name, "strict": self.strict,
                    "schema": self.schema_}
        return self.api_value()


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(min_length=1, description="Template with {column} placeholders.")

    @field_validator("text")
    @classmethod
    def _template_is_simple(cls, template: str) -> str:
        template_columns(template)
        return template


class ImagePart(_Strict):
    type: Literal["image_url"]
    column: str = Field(description="Column holding an image URL, path or s3:// URI, or a list.")
    detail: Literal["low", "high", "auto"] = "auto"


class RequestConfig(_Strict):
    endpoint: Literal["/v1/chat/completions", "/v1/responses", "/v1/embeddings"] = \
        CHAT_ENDPOINT
    model: str = Field(min_length=1)
    system: str | None = Field(default=None, description="System prompt (Responses: "
                                                         "instructions), sent as it is.")
    user: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = \
        Field(default=None, description="User message: a template with {column} fields, or "
                                        "a list of parts (chat and responses).")
    input: str | None = Field(
        default=None, description="Embeddings: the text to embed, a template with {column} "
                                  "fields.")
    dimensions: int | None = Field(
        default=None, gt=0, description="Embeddings: length of each vector; default: the "
                                        "model's.")
    image_max_side: int = Field(
        default=2048, gt=0, description="Inlined images larger than this (pixels) are scaled.")
    response_format: ResponseFormat = Field(default_factory=ResponseFormat)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    seed: int | None = None
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Any other Chat Completions parameter, as it is.")

    @field_validator("user", "input")
    @classmethod
    def _template_is_usable(cls, template: str | list | None) -> str | list | None:
        if isinstance(template, str):
            template_columns(template)
        elif template is not None and not template:
            raise ValueError("give at least one part")
        return template

    @model_validator(mode="after")
    def _fits_endpoint(self) -> RequestConfig:
        if self.embeddings:
            given = [f for f in GENERATION_FIELDS if getattr(self, f) is not None]
            if self.response_format.type != "text":
                given.append("response_format")
            if given:
                raise ValueError(f"{', '.join(given)}: not used by /v1/embeddings; it embeds "
                                 "`input`")
            if self.input is None:
                raise ValueError("an embeddings request needs `input`, the template of the "
                                 "text to embed, e.g. \"{title}: {overview}\"")
            if self.dimensions is None and self.model not in EMBEDDING_DIMENSIONS:
                raise ValueError(f"set `dimensions`, the length of the vectors of "
                                 f"{self.model}; known models: "
                                 f"{', '.join(EMBEDDING_DIMENSIONS)}")
            if self.dimensions is not None and self.model in FIXED_DIMENSIONS:
                raise ValueError(f"dimensions: {self.model} does not take it (its vectors "
                                 f"have {EMBEDDING_DIMENSIONS[self.model]:,}); leave it out")
            most = EMBEDDING_DIMENSIONS.get(self.model)
            if self.dimensions is not None and most and self.dimensions > most:
                raise ValueError(f"dimensions: {self.model} gives at most {most:,}, not "
                                 f"{self.dimensions:,}")
            return self
        given = [f for f in ("input", "dimensions") if getattr(self, f) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only used by /v1/embeddings; the message "
                             "is `user`")
        if self.user is None:
            raise ValueError("`user` is required: the user message, a template with {column} "
                             "fields, or a list of parts")
        if self.responses and self.seed is not None:
            raise ValueError("seed: the Responses API does not take it")
        return self

    @property
    def embeddings(self) -> bool:
        return self.endpoint == EMBEDDINGS_ENDPOINT

    @property
    def responses(self) -> bool:
        return self.endpoint == RESPONSES_ENDPOINT

    @property
    def vector_size(self) -> int:
        """The length of an embeddings job's vectors."""
        return self.dimensions or EMBEDDING_DIMENSIONS[self.model]

    def text_parts(self) -> list[str]:
        """The text templates of the user message (embeddings: the input), in order."""
        if self.embeddings:
            return [self.input]
        if isinstance(self.user, str):
            return [self.user]
        return [p.text for p in self.user if isinstance(p, TextPart)]

    def image_parts(self) -> list[ImagePart]:
        return [p for p in self.user if isinstance(p, ImagePart)] \
            if isinstance(self.user, list) else []

    def text_columns(self) -> list[str]:
        """Columns of the text templates (an empty one means the row is skipped)."""
        columns: list[str] = []
        for template in self.text_parts():
            columns += [c for c in template_columns(template) if c not in columns]
        return columns

    def columns(self) -> list[str]:
        """Every column the user message reads."""
        return self.text_columns() + [
            p.column for p in self.image_parts() if p.column not in self.text_columns()]

    def body_parameters(self) -> dict[str, Any]:
        """Everything of the request body except the messages (embeddings: the input).
        Embeddings come back as base64, a quarter of the size of a list of numbers."""
        body: dict[str, Any] = {"model": self.model}
        if self.embeddings:
            body["encoding_format"] = "base64"
            if self.dimensions is not None:
                body["dimensions"] = self.dimensions
            return {**body, **self.extra}
        for name in ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed"):
            value = getattr(self, name)
            if value is not None:
                body["max_output_tokens" if self.responses and name.startswith("max_") else
                     name] = value
        if self.responses:
            text_format = self.response_format.responses_value()
            if text_format:
                body["text"] = {"format": text_format}
        elif self.response_format.api_value():
            body["response_format"] = self.response_format.api_value()
        body.update(self.extra)
        return body

    def output_ceiling(self) -> int | None:
        """Most output tokens a request can be billed for; None: no bound."""
        if self.embeddings:
            return 0
        return self.max_completion_tokens or self.max_tokens


ProviderKind = Literal["local", "openai", "azure", "anthropic", "gemini"]


class ProviderConfig(_Strict):
    kind: ProviderKind | None = Field(
        default=None, description="Default: openai when OPENAI_API_KEY is set, else local.")
    base_url: str | None = Field(
        default=None, description="API base URL; for local, a running `enrichflow serve`; "
                                  "for azure, https://RESOURCE.openai.azure.com/openai/v1/ "
                                  "(default: from AZURE_OPENAI_ENDPOINT); for anthropic, "
                                  "default https://api.anthropic.com; for gemini, default "
                                  "https://generativelanguage.googleapis.com/.")
    api_key_secret: str | None = Field(
        default=None, description="Name of a Prefect Secret block holding the API key.")
    local_data_dir: str | None = Field(
        default=None, description="Data folder of the embedded local server.")


class PriceOverride(_Strict):
    """USD per million tokens for the job's model; batch prices default to half."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    batch_input: float | None = Field(default=None, ge=0)
    batch_output: float | None = Field(default=None, ge=0)


class CacheConfig(_Strict):
    enabled: bool = Field(default=True, description="Reuse answers to identical requests.")
    uri: str | None = Field(default=None, description="Default: <output>/_cache/answers.parquet")


class LimitsConfig(_Strict):
    max_requests_per_shard: int = Field(default=MAX_REQUESTS_PER_BATCH, gt=0,
                                        le=MAX_REQUESTS_PER_BATCH)
    max_bytes_per_shard: int = Field(default=MAX_BATCH_FILE_BYTES, gt=0,
                                     le=MAX_BATCH_FILE_BYTES)
    max_attempts: int = Field(default=3, ge=1, le=10)
    max_shards_in_flight: int = Field(
        default=12, gt=0, description="Batches of a run unfinished at once, at most: bounds "
                                      "the input files at the provider and the results "
                                      "waiting here, also where no token limit does.")
    poll_interval_min: float = Field(default=1.0, gt=0)
    poll_interval_max: float = Field(default=60.0, gt=0)
    max_wait_hours: float = Field(default=25.0, gt=0)
    max_failed_share: float = Field(
        default=0.5, ge=0, le=1, description="A run with a larger share of failed rows ends "
                                             "failed (its output still written).")
    enqueued_token_budget: int | None = Field(
        default=None, gt=0, description="Prompt tokens in unfinished batches at most; default: "
                                        "against OpenAI, its tier-1 limit for known models; "
                                        "against other servers, none.")
    deadline_lead_seconds: float = Field(
        default=3600, gt=0, description="With a deadline: this long before it (or before a "
                                        "batch's 24-hour window ends), the rows not answered "
                                        "yet go through the synchronous API.")

    @model_validator(mode="after")
    def _ordered(self) -> LimitsConfig:
        if self.poll_interval_min > self.poll_interval_max:
            raise ValueError("poll_interval_min must not exceed poll_interval_max")
        return self


class CanaryConfig(_Strict):
    """A sample of rows answered first and checked, before any batch is uploaded."""

    rows: int = Field(default=20, gt=0, le=1000, description="Rows in the sample: the first "
                                                              "rows to send, at most half.")
    max_failure_rate: float = Field(
        default=0.1, ge=0, le=1, description="Stop the job when a larger share of the sample "
                                             "has no usable answer.")
    mode: Literal["sync", "batch"] = Field(
        default="sync", description="sync: the synchronous API, in seconds, at synchronous "
                                    "prices; batch: one small batch, at batch prices.")
    again: Literal["when_changed", "always"] = Field(
        default="when_changed", description="when_changed: a request (prompt, schema, model, "
        "parameters) that passed a canary before, by the same answer cache, is not checked "
        "again: its new rows go in the batches; always: every run checks its sample.")

    def sample_size(self, requests: int) -> int:
        """The first `rows` of the `requests` to send, but at most half of them, so that
        a small job still goes through the Batch API."""
        return min(self.rows, requests // 2)


class RunnerConfig(_Strict):
    """Where the per-shard work (reading, rendering and counting rows; collecting
    batches) runs."""

    kind: Literal["threads", "dask"] = Field(
        default="threads", description="threads: in the run's process; dask: on a Dask "
                                       "cluster, through prefect-dask.")
    address: str | None = Field(
        default=None, description="dask: an existing scheduler, e.g. tcp://10.0.0.5:8786; "
                                  "default: a LocalCluster of worker processes here.")
    workers: int | None = Field(
        default=None, gt=0, description="dask LocalCluster: worker processes; default: one "
                                        "per CPU.")


class Job(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                      description="Job name: letters, digits, '.', '_' or '-'.")
    dataset: DatasetConfig
    request: RequestConfig
    output: str = Field(min_length=1, description="Output directory, local or s3://.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec/s3fs options for every s3:// location (endpoint_url, client_kwargs "
                    "with region_name...). Credentials come from the AWS chain, never from here.")
    provider: ProviderConfig = Field(default_factory=ProviderConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    price: PriceOverride | None = None
    deadline: AwareDatetime | None = Field(
        default=None, description="When the rows are needed, with its time zone "
                                  "(2026-12-04T07:00:00Z). Batches unfinished "
                                  "limits.deadline_lead_seconds before it are cancelled and "
                                  "their unanswered rows answered through the synchronous API "
                                  "(flex where the model offers it). Off when absent.")
    max_cost_usd: float | None = Field(
        default=None, gt=0, description="Stop before uploading if the estimate may pass "
                                        "this, and stop sending once the bill leaves no room.")
    cache: CacheConfig = Field(default_factory=CacheConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    canary: CanaryConfig | None = Field(
        default=None, description="Check a sample of rows before uploading; off when absent.")
    cleanup: bool = Field(
        default=True, description="Delete a batch's files at the provider once its results "
                                  "are collected, and the collected results once the output "
                                  "is written.")

    @model_validator(mode="after")
    def _provider_takes_the_request(self) -> Job:
        kind = self.provider.kind
        if kind in ("anthropic", "gemini") and self.request.endpoint != CHAT_ENDPOINT:
            raise ValueError(f"provider.kind {kind} answers chat requests; request.endpoint "
                             f"{self.request.endpoint} is OpenAI's only: use {CHAT_ENDPOINT} "
                             "(the default) or another provider")
        if kind == "anthropic":
            if self.canary and self.canary.mode == "batch":
                raise ValueError("canary.mode batch: on anthropic a canary batch could not "
                                 "be found again after a crash (Message Batches carry no "
                                 "metadata); use canary.mode sync (the default)")
        return self

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, options: dict[str, Any]) -> dict[str, Any]:
        def secret_keys(node: Any) -> list[str]:
            if not isinstance(node, dict):
                return []
            found = [k for k in node if any(w in k.lower() for w in SECRET_OPTION_WORDS)]
            return found + [k for v in node.values() for k in secret_keys(v)]

        found = secret_keys(options)
        if found:
            raise ValueError(f"{', '.join(found)}: credentials do not belong in a job file; "
                             "use the AWS environment variables, a profile or an instance role")
        return options

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Job:
        """The job of a job file (ConfigError names the file and every wrong field)."""
        return load_job(path, **overrides)

    @classmethod
    def from_text(cls, text: str, **overrides: Any) -> Job:
        """The job of a job file's YAML text."""
        return parse_job(text, "the job", **overrides)

    def to_yaml(self) -> str:
        """The job as a job file: the settings that differ from the defaults."""
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude_defaults=True),
                              sort_keys=False, allow_unicode=True)

    def key(self, fingerprint: str) -> str:
        """The job's key: its config and the fingerprint of its data's bytes. The same key
        means the same job: its complete output is not written again."""
        return hashlib.sha256(f"{self.config_hash()}:{fingerprint}".encode()).hexdigest()[:24]

    def request_hash(self) -> str:
        """Hash of the request (prompt, schema, model, parameters): what a canary checks."""
        return hashlib.sha256(json.dumps(self.request.model_dump(mode="json", by_alias=True),
                                         sort_keys=True).encode()).hexdigest()

    def config_hash(self) -> str:
        """Hash of what decides the answers; output and provider do not change them."""
        decisive = self.model_dump(mode="json", by_alias=True,
                                   include={"name", "dataset", "request"})
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def template_columns(template: str) -> list[str]:
    """The `{column}` fields of a message template, in order, without repeats."""
    columns: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"the template is malformed ({exc}); write literal braces as "
                         "{{ and }}") from exc
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field or field.isdigit():
            raise ValueError("every {} in the template must name a column, e.g. {Overview}")
        if spec or conversion:
            raise ValueError(f"{{{field}...}}: format specs and conversions are not "
                             "supported; write just {column}")
        if field not in columns:
            columns.append(field)
    return columns


def load_job(path: str | Path, **overrides: Any) -> Job:
    """Read and validate a job file; `overrides` are dotted field names (`dataset.limit`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such job file") from exc
    return parse_job(text, str(path), **overrides)


def parse_job(text: str, source: str, **overrides: Any) -> Job:
    """A job from its YAML text (`source` names where it is from in errors)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job file is a YAML mapping with name, dataset, "
                          "request and output")
    return validate_job(raw, f"{source}: invalid job file", **overrides)


def resolve_job(config_path: str | None, output: str | None = None, limit: int | None = None,
                provider: str | None = None, base_url: str | None = None,
                model: str | None = None, runner: str | None = None,
                job: str | None = None, deadline: str | None = None) -> Job:
    """The job (its file, or `job`, its YAML text) with the run's overrides applied;
    raises ConfigError if invalid."""
    overrides = {"output": output, "dataset.limit": limit, "provider.kind": provider,
                 "provider.base_url": base_url, "request.model": model, "runner.kind": runner,
                 "deadline": deadline}
    if (config_path is None) == (job is None):
        raise ConfigError("give the job as config_path (a job file) or as job (its YAML "
                          "text), one of the two")
    if job is not None:
        return Job.from_text(job, **overrides)
    return load_job(config_path, **overrides)


def validate_job(raw: dict[str, Any], context: str, **overrides: Any) -> Job:
    """A job from its mapping (a job file's, or one built in Python) and dotted
    `overrides`; ConfigError starts with `context` and names every wrong field."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        if value is not None:
            set_field(raw, dotted, value)
    try:
        return Job.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{context}: {_describe(exc)}") from exc


def set_field(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a nested field of a job mapping by its dotted name (`limits.max_attempts`)."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        raw = raw.setdefault(key, {})
    raw[leaf] = value


def _fields_at(path: list[str]) -> list[str]:
    """The fields a job file can have at `path` (["dataset"]: the dataset's)."""
    models: list[type[BaseModel]] = [Job]
    for name in path:
        models = [inner for model in models if name in model.model_fields
                  for inner in _models_in(model.model_fields[name].annotation)]
    return sorted({field.alias or name for model in models
                   for name, field in model.model_fields.items()})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The Pydantic models a field's type holds (`X | None`, `list[A | B]`, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _describe(exc: ValidationError) -> str:
    """Every problem of the file on one line: `field: what is wrong; field: ...`."""
    lines: list[str] = []
    errors = exc.errors()
    for error in errors:
        # a union (`user`: text or parts) reports each branch; name the field, not the branch
        loc = [str(p) for i, p in enumerate(error["loc"])
               if not _is_branch(p) and not _is_tag(error["loc"], i)]
        if error["type"] == "string_type" and len(errors) > 1 and \
                any(str(p) == "str" for p in error["loc"]):
            continue
        field = ".".join(loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _fields_at(loc[:-1]), n=1)
            message = (f"unknown field; did you mean {close[0]}?" if close else
                       "unknown field; check the spelling against docs/job-file.md")
        elif error["type"] == "literal_error":
            message = f"must be one of {error['ctx']['expected']}"
        elif error["type"] == "union_tag_invalid":
            message = f"type must be one of {error['ctx']['expected_tags']}"
        line = f"{field}: {message}"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def _is_branch(part: object) -> bool:
    return isinstance(part, str) and (part == "str" or "[" in part)


def _is_tag(loc: tuple, i: int) -> bool:
    """A message part's `type` tag, which pydantic puts after the list index."""
    return i > 0 and isinstance(loc[i - 1], int) and loc[i] in ("text", "image_url")
