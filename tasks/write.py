"""Step 7b, write: the enriched Parquet and its manifest, whole or not at all.

The Parquet file is staged and moved into place first, `_manifest.json` last: a reader
that finds the manifest finds the data it describes. The manifest's name starts with `_`
because Parquet readers (pandas, pyarrow.dataset) skip such names in a dataset folder.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from enrichflow.storage import Location
from tasks import as_task

DATA_FILE = "part-00000.parquet"
MANIFEST = "_manifest.json"


def write_output(location: Location, table: pa.Table, manifest: dict[str, Any]) -> None:
    """Write the dataset, then its manifest."""
    location.write_parquet(DATA_FILE, table)
    location.write_json(MANIFEST, manifest)


def read_manifest(location: Location) -> dict[str, Any] | None:
    return location.read_json(MANIFEST)


write_output_task = as_task(write_output, "write output")
