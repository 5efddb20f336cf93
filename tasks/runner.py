"""Where the per-shard tasks run: the run's own threads, or a Dask cluster.

The tasks sent here take and return small, serialisable values (the job, the dataset's
description, row numbers and ids, counts) and reach the dataset, the output's storage and
the Batch API themselves, so that they can run in another process or on another host.
Only the flow writes the run journal: a task's side effects are files it alone writes
(its results), which the flow journals once the task has returned.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Task
from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner

from enrichflow.config import RunnerConfig

Calls = Callable[[Task, list[dict[str, Any]]], list[Any]]
THREADS_AT_ONCE = 1  # threads share the run's memory and its GIL: one at a time keeps
# memory to one shard's, and Arrow's readers use every core on their own
# the steps that run on Dask workers
STEPS = ("enrichflow.tasks.prepare", "enrichflow.tasks.collect")


def in_turn(task: Task, calls: list[dict[str, Any]]) -> list[Any]:
    """The calls one after another, without Prefect (`enrichflow estimate`)."""
    return [task.fn(**call) for call in calls]


class Runner:
    """Runs a task's calls, `at_once` at a time, on the flow's own task runner (threads)
    or on Dask. Memory holds what `at_once` calls hold."""

    def __init__(self, task_runner: TaskRunner | None = None, at_once: int = THREADS_AT_ONCE):
        self.task_runner, self.at_once = task_runner, at_once

    def map(self, task: Task, calls: list[dict[str, Any]]) -> list[Any]:
        """Each call's result, in the order of `calls`; the first failure is raised. A
        call starts as soon as one of the `at_once` before it has returned."""
        results: list[Any] = []
        running: deque[PrefectFuture] = deque()
        for call in calls:
            if len(running) == self.at_once:
                results.append(running.popleft().result())
            running.append(task.submit(**call) if self.task_runner is None
                           else self.task_runner.submit(task, call))
        return results + [future.result() for future in running]


@contextmanager
def open_runner(config: RunnerConfig) -> Iterator[Runner]:
    """The job's runner for the length of the run. Without an address, Dask runs a
    LocalCluster of worker processes here, which report their task runs to the run's
    Prefect API (also a temporary one); a cluster at `address` reports to the API its
    workers' PREFECT_API_URL names."""
    if config.kind == "threads":
        yield Runner()
        return
    from prefect_dask import DaskTaskRunner

    logging.getLogger("distributed").setLevel(logging.WARNING)
    workers = config.workers or os.cpu_count() or 1
    if config.address:
        task_runner = DaskTaskRunner(address=config.address)
    else:
        with get_client(sync_client=True) as client:
            api_url = str(client.api_url)
        task_runner = DaskTaskRunner(cluster_kwargs={
            "n_workers": workers, "processes": True, "threads_per_worker": 1,
            "dashboard_address": ":0", "silence_logs": logging.WARNING,
            "env": {"PREFECT_API_URL": api_url, "DASK_LOGGING__DISTRIBUTED": "warning"}})
    with task_runner:
        # at start-up, not in the first tasks; a worker lost meanwhile is Dask's to replace
        task_runner.client.run(import_steps, on_error="ignore")
        yield Runner(task_runner, at_once=2 * workers)


def import_steps() -> None:
    """What a worker's first task would import: Prefect's task engine and the steps."""
    for name in ("prefect.task_engine", *STEPS):
        importlib.import_module(name)
