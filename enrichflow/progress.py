"""A run's progress bar, for whoever follows it from the run's own process: tqdm's widget
in Jupyter, one line on a terminal. It hears the flow through `enrichflow.tasks.watch`:
the estimate before sending, then every batch at every poll."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai.types import Batch

    from enrichflow.tasks.estimate import Estimate


class ProgressBar:
    """Requests done (completed or failed) across the run's batches and its synchronous
    canary, with the failed, the batches running, elapsed time and time left; its total
    is the requests the estimate counts, those sent before by a run this one resumes
    included."""

    def __init__(self, job_name: str):
        self.job_name = job_name
        self.bar = None
        self.done: dict[str, int] = {}  # by batch
        self.failed: dict[str, int] = {}
        self.answered_outside = 0  # the synchronous canary's

    def estimated(self, estimate: Estimate) -> None:
        show_in_ipython(estimate)
        total = estimate.requests + estimate.already_sent
        if total and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.job_name, unit="request",
                            dynamic_ncols=True)

    def polled(self, batches: list[Batch]) -> None:
        if self.bar is None:
            return
        from enrichflow.tasks.wait import TERMINAL

        for batch in batches:
            counts = batch.request_counts
            self.done[batch.id] = counts.completed + counts.failed if counts else 0
            self.failed[batch.id] = counts.failed if counts else 0
        running = sum(1 for b in batches if b.status not in TERMINAL)
        self.bar.set_postfix_str(f"{sum(self.failed.values()):,} failed, {running} of "
                                 f"{len(self.done)} batch(es) running", refresh=False)
        self._show_done()

    def answered(self, requests: int) -> None:
        self.answered_outside += requests
        self._show_done()

    def finished(self) -> None:
        """The run ended: every request has its answer or its error."""
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _show_done(self) -> None:
        if self.bar is not None:
            done = sum(self.done.values()) + self.answered_outside
            self.bar.update(min(done, self.bar.total) - self.bar.n)


@contextmanager
def logs_above_the_bar() -> Iterator[None]:
    """While the block runs, each line of the root logger's console handlers (Prefect's)
    is written with the terminal's bars lifted and drawn again below it, so that a log
    line never runs into a bar."""
    root = logging.getLogger()
    consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                and getattr(h, "stream", None) in (sys.stderr, sys.stdout)]
    wrapped = [_AboveTheBar(handler) for handler in consoles]
    for handler, wrapper in zip(consoles, wrapped, strict=True):
        root.removeHandler(handler)
        root.addHandler(wrapper)
    try:
        yield
    finally:
        for handler, wrapper in zip(consoles, wrapped, strict=True):
            root.removeHandler(wrapper)
            root.addHandler(handler)


class _AboveTheBar(logging.Handler):
    """`inner`, writing while the bars on its stream are lifted."""

    def __init__(self, inner: logging.StreamHandler):
        super().__init__(inner.level)
        self.inner = inner

    def handle(self, record: logging.LogRecord) -> bool:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.inner.stream):
            return self.inner.handle(record)


def show_in_ipython(value: Any) -> None:
    """Show `value` in IPython (Jupyter: its HTML); elsewhere the run's log has it."""
    shell = sys.modules.get("IPython")
    if shell is not None and shell.get_ipython() is not None:
        from IPython.display import display

        display(value)
