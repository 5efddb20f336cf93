"""Images for vision requests: each row's image values as image parts of a message.

An `http(s)://` URL passes through as it is (the provider fetches it). A local path, a
`file://` URL or an `s3://` URI is read and inlined as a base64 `data:` URL whose MIME
type comes from the bytes, scaled down first when its longer side passes `max_side`,
so that requests stay within the provider's limits. A value that cannot be used makes
its row fail with an error naming the row and the image, before anything is sent.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

READ_THREADS = 8
# Formats every OpenAI vision model takes; anything else is converted to PNG.
SENT_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp",
              "GIF": "image/gif"}


def image_values(column: pa.ChunkedArray) -> list[list[str] | None]:
    """Each row's image references: a list column, a JSON array in a string, or one value."""
    values: list[list[str] | None] = []
    for value in column.to_pylist():
        if value is None or isinstance(value, list):
            values.append([v for v in value if v] if value else None)
        elif isinstance(value, str) and value.strip().startswith("["):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = [value]
            values.append([str(v) for v in parsed if v] or None)
        else:
            text = str(value).strip()
            values.append([text] if text else None)
    return values


def image_parts_json(column: pa.ChunkedArray, name: str, keys: list[str], detail: str,
                     max_side: int, storage_options: dict[str, Any] | None = None,
                     responses: bool = False) -> tuple[pa.Array, pa.Array]:
    """Per row: the JSON of its image parts (comma-separated) or null, and why it is null.
    The parts are Chat Completions', or the Responses API's with `responses`."""
    rows = image_values(column)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        outcomes = list(pool.map(
            lambda item: _row_parts(*item, name, detail, max_side, storage_options or {},
                                    responses),
            zip(keys, rows, strict=True)))
    parts, errors = zip(*outcomes, strict=True) if outcomes else ((), ())
    return pa.array(parts, pa.string()), pa.array(errors, pa.string())


def _row_parts(key: str, references: list[str] | None, column: str, detail: str,
               max_side: int, storage_options: dict[str, Any], responses: bool
               ) -> tuple[str | None, str | None]:
    if not references:
        return None, f"row {key!r} has no image in column {column!r}"
    parts = []
    for reference in references:
        try:
            url = _image_url(reference, max_side, storage_options)
        except ImageError as exc:
            return None, f"row {key!r}, column {column!r}: image {reference!r} {exc}"
        part = {"type": "input_image", "image_url": url, "detail": detail} if responses \
            else {"type": "image_url", "image_url": {"url": url, "detail": detail}}
        parts.append(json.dumps(part, separators=(",", ":")))
    return ",".join(parts), None


class ImageError(ValueError):
    pass


def _image_url(reference: str, max_side: int, storage_options: dict[str, Any]) -> str:
    if reference.startswith(("http://", "https://")):
        return reference
    try:
        options = storage_options if reference.startswith("s3://") else {}
        with fsspec.open(reference, "rb", **options) as handle:
            raw = handle.read()
    except FileNotFoundError as exc:
        raise ImageError("does not exist") from exc
    except Exception as exc:  # fsspec backends raise their own kinds
        raise ImageError(f"cannot be read: {exc}") from exc
    mime, data = inline_image(raw, max_side)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def inline_image(raw: bytes, max_side: int) -> tuple[str, bytes]:
    """(MIME type, bytes) to send: the file itself, or a scaled-down or converted copy."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            fmt = image.format
            if max(image.size) <= max_side and fmt in SENT_AS_IS:
                return SENT_AS_IS[fmt], raw
            image.thumbnail((max_side, max_side))
            out_format = fmt if fmt in SENT_AS_IS and fmt != "GIF" else "PNG"
            if out_format == "JPEG" and image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format=out_format)
            return SENT_AS_IS[out_format], buffer.getvalue()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError("is not an image Pillow can read") from exc
