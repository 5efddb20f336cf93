"""Step 7b, write: the enriched Parquet parts and the manifest, whole or not at all.

The old manifest goes first; each part file is staged and moved into place as it is
merged; parts an earlier, longer output left behind are removed; `_manifest.json` comes
last: a reader (or a re-run) that finds a manifest finds the data it describes, never
data of one run beside the manifest of another. The names of the manifest and of
everything else that is not data start with `_`, which Parquet readers (pandas,
pyarrow.dataset) skip in a dataset folder.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from enrichflow.storage import Location

PART_ROWS = 50_000  # input rows per output part
MANIFEST = "_manifest.json"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def start_output(location: Location) -> None:
    """From here until `finish_output`, the output has no manifest: it is not complete."""
    location.remove(MANIFEST)


def write_part(location: Location, index: int, table: pa.Table) -> None:
    location.write_parquet(part_name(index), table)


def finish_output(location: Location, parts: int, manifest: dict[str, Any]) -> None:
    """Remove parts beyond the `parts` written, then write the manifest."""
    for name in location.list("part-*.parquet"):
        if name not in {part_name(i) for i in range(parts)}:
            location.remove(name)
    location.write_json(MANIFEST, manifest)


def read_manifest(location: Location) -> dict[str, Any] | None:
    return location.read_json(MANIFEST)
