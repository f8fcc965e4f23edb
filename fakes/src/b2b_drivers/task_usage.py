"""`make bench`'s Airflow listener: each task process, as its task ends, appends its own CPU seconds,
peak RSS and wall time to the JSON-lines file named by `B2B_BENCH_TASK_USAGE` (nothing when unset).

Loaded only where the bench points `[core] plugins_folder` at a file importing `TaskUsagePlugin`. Airflow 3
calls task listeners in the task process itself (the Task SDK's task runner, forked per task by the
supervisor), so `getrusage(RUSAGE_SELF)` there is that task's alone: a forked child starts with its own
CPU times and its own high-water mark of resident memory.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import psutil
from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

USAGE_FILE = "B2B_BENCH_TASK_USAGE"


def _record(task_instance, state: str) -> None:
    path = os.environ.get(USAGE_FILE)
    if not path:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    row = {
        "dag_id": task_instance.dag_id, "run_id": task_instance.run_id, "task_id": task_instance.task_id,
        "map_index": task_instance.map_index, "state": state, "pid": os.getpid(),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "wall_s": round(time.time() - psutil.Process().create_time(), 3),
    }  # fmt: skip
    # One short write per task in append mode: lines of concurrent tasks do not interleave.
    with open(path, "a") as out:
        out.write(json.dumps(row) + "\n")


@hookimpl
def on_task_instance_success(previous_state, task_instance) -> None:
    _record(task_instance, "success")


@hookimpl
def on_task_instance_failed(previous_state, task_instance, error) -> None:
    _record(task_instance, "failed")


@hookimpl
def on_task_instance_skipped(previous_state, task_instance) -> None:
    _record(task_instance, "skipped")


class TaskUsagePlugin(AirflowPlugin):
    name = "b2b_bench_task_usage"
    listeners = [sys.modules[__name__]]
