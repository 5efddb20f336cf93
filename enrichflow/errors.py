"""Errors a user can act on: each message names the file, field or row and the fix."""


class ConfigError(ValueError):
    """A job file that cannot run as written."""


class InputError(ValueError):
    """Input data that cannot be enriched as it is (missing file, column, duplicate id...)."""


class StorageError(OSError):
    """An output or state location that cannot be read or written."""


class CostLimitError(ValueError):
    """The job's estimate may pass its `max_cost_usd` (nothing was uploaded), or what it
    was billed left no room for the rest (the rows answered are written)."""


class ProviderError(RuntimeError):
    """The Batch API did not answer, or a batch did not finish in time; it runs on there."""


class CanaryFailedError(RuntimeError):
    """Too many of the canary's sample rows got no usable answer; nothing was uploaded."""


class RowsFailedError(RuntimeError):
    """More rows failed than `limits.max_failed_share` allows; the output is written."""


class LeaseError(RuntimeError):
    """Another run is writing the same output; this one must not send anything."""
