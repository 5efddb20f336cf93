"""Step 7b, write: the enriched Parquet and its manifest, whole or not at all.

The old manifest goes first, then the Parquet file is staged and moved into place, and
`_manifest.json` comes last: a reader (or a re-run) that finds a manifest finds the data
it describes, never data of one run beside the manifest of another. The manifest's name
starts with `_` because Parquet readers (pandas, pyarrow.dataset) skip such names in a
dataset folder.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from enrichflow.storage import Location
from tasks import as_task

DATA_FILE = "part-00000.parquet"
MANIFEST = "_manifest.json"


def write_output(location: Location, table: pa.Table, manifest: dict[str, Any]) -> None:
    """Drop the old manifest, write the dataset, then its manifest."""
    location.remove(MANIFEST)
    location.write_parquet(DATA_FILE, table)
    location.write_json(MANIFEST, manifest)


def read_manifest(location: Location) -> dict[str, Any] | None:
    return location.read_json(MANIFEST)


write_output_task = as_task(write_output, "write output")
