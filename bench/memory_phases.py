"""Where a run's memory goes, phase by phase: the profile behind bench/e2e_scale.py's peaks.

Runs the movies job (`enrichflow run --force --no-cache`, as e2e_scale.py does) inside
this process while a thread samples, every 0.2 s, the run's RSS, the bytes Arrow's memory
pool holds (tables and arrays; the rest of the RSS is Python objects, libraries and
freed memory not given back), which of the run's phases are on the stacks of its threads,
and the RSS of each child process (Prefect's temporary server, the embedded server's
answering workers). Prints, for each phase, its share of the samples and the most RSS and
Arrow bytes seen while it ran (phases overlap: collecting runs while later shards render),
then each process's peak. tracemalloc would not see Arrow's buffers, which are most of
what grows with the table.

    .venv/bin/python bench/memory_phases.py [--rows 1000000] [--work DIR]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

# isort: off
# enrichflow before pyarrow: it chooses the memory pool that pyarrow loads with
from enrichflow.cli import main as run_enrichflow
import pyarrow as pa
# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_scale import check_output, job_file  # noqa: E402

# The functions that mark a phase while they are on a thread's stack, by phase
PHASES = {"prepare: scan rows": "scan_rows", "prepare: plan shards": "plan_shards",
          "canary": "run_canary", "send: render shards": "requests",
          "send: upload": "upload_shard", "wait": "wait_for_batches",
          "collect": "collect_shard", "merge and write": "merge_part"}
MiB = 2**20


class Sampler(threading.Thread):
    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.done = interval, threading.Event()
        self.me = psutil.Process()
        self.samples: list[tuple[set[str], int, int]] = []  # (phases, RSS, Arrow bytes)
        self.process_peaks: dict[str, int] = defaultdict(int)

    def run(self) -> None:
        own = threading.get_ident()
        while not self.done.wait(self.interval):
            names = set()
            for ident, frame in sys._current_frames().items():
                while frame is not None and ident != own:
                    names.add(frame.f_code.co_name)
                    frame = frame.f_back
            phases = {phase for phase, name in PHASES.items() if name in names}
            rss = self.me.memory_info().rss
            self.samples.append((phases, rss, pa.total_allocated_bytes()))
            self.process_peaks["the run"] = max(self.process_peaks["the run"], rss)
            for child in self.me.children(recursive=True):
                try:
                    name = " ".join(child.cmdline()[1:3])[:60]
                    self.process_peaks[name] = max(self.process_peaks[name],
                                                   child.memory_info().rss)
                except psutil.Error:
                    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the table and output (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="enrichflow-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    path = job_file(args.rows, work)
    sampler = Sampler()
    sampler.start()
    started = time.perf_counter()
    code = run_enrichflow(["run", str(path), "--force", "--no-cache"])
    seconds = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    kernel_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the check
    if code:
        sys.exit(f"the run failed ({code})")
    check_output(work / f"out-{args.rows}", args.rows)
    print(f"\n{args.rows:,} rows in {seconds:.0f} s, Arrow's memory pool "
          f"{pa.default_memory_pool().backend_name}; by phase (samples every "
          f"{sampler.interval} s):")
    print(f"{'phase':24} {'share':>6} {'peak RSS':>10} {'peak Arrow':>11}")
    total = len(sampler.samples)
    for phase in PHASES:
        seen = [(rss, arrow) for phases, rss, arrow in sampler.samples if phase in phases]
        if seen:
            print(f"{phase:24} {len(seen) / total:6.0%} {max(r for r, _ in seen) / MiB:6,.0f} MiB"
                  f" {max(a for _, a in seen) / MiB:7,.0f} MiB")
    idle = [rss for phases, rss, _ in sampler.samples if not phases]
    if idle:
        print(f"{'(between phases)':24} {len(idle) / total:6.0%} {max(idle) / MiB:6,.0f} MiB")
    print(f"peak RSS of the run by the kernel's count (between samples too): "
          f"{kernel_peak / MiB:,.0f} MiB")
    print("peak RSS by process (sampled):")
    for name, peak in sorted(sampler.process_peaks.items(), key=lambda item: -item[1]):
        print(f"  {peak / MiB:6,.0f} MiB  {name}")


if __name__ == "__main__":
    main()
