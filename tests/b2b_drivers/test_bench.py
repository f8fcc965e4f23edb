"""`make bench`'s and `make profile`'s own parts: py-spy's samples read into top functions, the
listener that makes each task process report its own CPU and memory, and the targets' verdicts. The
runs themselves (about 15 minutes at 100,000 prospects) are `make bench`, not part of `make test`."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from airflow.sdk._shared.listeners.listener import ListenerManager
from airflow.sdk._shared.listeners.spec import taskinstance

from b2b_drivers import profile, task_usage
from b2b_drivers.bench import targets

HOT_SCRIPT = textwrap.dedent("""
    import subprocess, sys, time

    def spin(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            sum(range(1000))

    def hot():
        spin(1.5)

    def warm():
        spin(0.5)

    def cold():
        time.sleep(1.0)  # waiting: not CPU, so not sampled

    hot()
    warm()
    cold()
    subprocess.run([sys.executable, "-c", "import time\\nend = time.process_time() + 0.8\\n"
                    "while time.process_time() < end: sum(range(1000))"], check=True)
""")


def test_py_spy_samples_show_where_the_cpu_went_and_in_which_process(tmp_path: Path) -> None:
    script, output = tmp_path / "hot.py", tmp_path / "samples.txt"
    script.write_text(HOT_SCRIPT)
    subprocess.run(profile.sampled([sys.executable, str(script)], output), check=True, capture_output=True)
    samples = profile.read_samples(output)
    processes = profile.by_process(samples)
    parent, child = profile.STARTED, next(command for command in processes if command.endswith("sum(range(1000))"))
    # 2 CPU s in the script, 0.8 in its subprocess, none for the second of sleep (100 samples a second;
    # a loaded machine stretches them: a thread waiting for a core is sampled too).
    assert 150 <= processes[parent] <= 500 and 50 <= processes[child] <= 250
    assert processes[parent] > processes[child]
    top = {name: (inclusive, own) for name, inclusive, own in profile.top_functions(
        [sample for sample in samples if sample.process == parent])}  # fmt: skip
    hot = next(name for name in top if name.startswith("hot (") and name.endswith("hot.py)"))
    spin = next(name for name in top if name.startswith("spin ("))
    warm = next(name for name in top if name.startswith("warm ("))
    assert top[hot][0] > 2 * top[warm][0] > 0 and top[hot][1] == 0  # its time is spent in `spin`, which it calls
    assert top[spin][0] >= 80 and top[spin][0] >= top[hot][0] + top[warm][0] - 1
    assert not any(name.startswith("cold (") for name in top)
    table = profile.table([sample for sample in samples if sample.process == parent], "hot.py")
    assert table.splitlines()[0].startswith("hot.py: ") and "spin (" in table


def test_a_frame_names_its_function_and_file_from_the_package_down(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        'process 1:"python -m airflow dags test b2b_outcome_reconciliation";'
        "run (/x/.venv/lib/python3.11/site-packages/airflow/sdk/execution_time/task_runner.py:120);"
        "decode (/work/main/src/b2b_onboarding/clients/batch.py:88) 7\n"
        'process 1:"python -m airflow dags test b2b_outcome_reconciliation";'
        "run (/x/.venv/lib/python3.11/site-packages/airflow/sdk/execution_time/task_runner.py:121) 3\n"
    )
    samples = profile.read_samples(raw)
    assert samples[0].frames == ("run (airflow/sdk/execution_time/task_runner.py)", "decode (b2b_onboarding/clients/batch.py)")
    assert samples[0].count == 7 and samples[0].process == profile.STARTED
    child = profile.read_samples(_written(tmp_path / "child.txt", 'process 1:"";process 9:"python x.py";<module> (x.py:1) 2\n'))
    assert child[0].process == "python x.py" and child[0].frames == ("<module> (x.py)",)
    # Airflow's task runner is plumbing, left out; `decode` is in 7 of 10 samples, all of it its own.
    assert profile.top_functions(samples) == [("decode (b2b_onboarding/clients/batch.py)", 70.0, 70.0)]


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_listener_matches_airflows_task_listener_spec() -> None:
    manager = ListenerManager()
    manager.add_hookspecs(taskinstance)
    manager.add_listener(task_usage)  # pluggy refuses a hook whose arguments the spec does not have
    assert {"on_task_instance_success", "on_task_instance_failed", "on_task_instance_skipped"} <= {
        hook.name for hook in manager.pm.get_hookcallers(task_usage)}  # fmt: skip
    assert task_usage.TaskUsagePlugin.listeners == [task_usage]


def test_a_forked_task_process_reports_its_own_cpu_and_peak_memory(tmp_path: Path, monkeypatch) -> None:
    usage = tmp_path / "usage.jsonl"
    monkeypatch.setenv(task_usage.USAGE_FILE, str(usage))
    parent_memory = bytearray(300 * 1024 * 1024)  # the parent's own high-water mark is not the task's
    parent_memory[::4096] = b"\1" * len(parent_memory[::4096])
    del parent_memory
    resident_at_fork = psutil.Process().memory_info().rss / 2**20  # pages the task shares with its parent
    pid = os.fork()
    if pid == 0:  # the task process, as the supervisor forks it
        memory = bytearray(120 * 1024 * 1024)
        memory[::4096] = b"\1" * len(memory[::4096])
        sum(range(3_000_000))
        task = SimpleNamespace(dag_id="b2b_outcome_reconciliation", run_id="manual__1", task_id="write_customers",
                               map_index=2)  # fmt: skip
        task_usage.on_task_instance_success(previous_state=None, task_instance=task)
        os._exit(0)
    os.waitpid(pid, 0)
    (row,) = [json.loads(line) for line in usage.read_text().splitlines()]
    assert row["pid"] == pid and row["task_id"] == "write_customers" and row["map_index"] == 2
    assert row["state"] == "success" and 0 < row["cpu_s"] < 5 and row["wall_s"] < 30
    # Its 120 MB on top of what it touched of its parent's pages; never the parent's peak (300 MB more).
    assert 120 <= row["peak_rss_mb"] <= resident_at_fork + 180
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 >= row["peak_rss_mb"] + 100


def test_without_the_variable_nothing_is_written(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(task_usage.USAGE_FILE, raising=False)
    monkeypatch.chdir(tmp_path)
    task_usage.on_task_instance_failed(None, SimpleNamespace(dag_id="d", run_id="r", task_id="t", map_index=-1), "boom")
    assert list(tmp_path.iterdir()) == []


def _run(mode: str, dag: str, wall: float, cpu: float, requests: int, n: int = 100_000, **more) -> dict:
    return {"mode": mode, "n": n, "dag": dag, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": 400.0,
            "throttle_failures": more.get("failures", 0), "throttled_429": more.get("throttled", 0),
            "commerce_requests": requests // 2, "dataverse_requests": requests - requests // 2}  # fmt: skip


def _task(name: str, rss: float, index: int = -1) -> dict:
    return {"dag_id": "b2b_outcome_reconciliation", "task_id": name, "map_index": index, "peak_rss_mb": rss,
            "cpu_s": 1.0, "wall_s": 2.0, "state": "success", "run_id": "manual__1"}  # fmt: skip


def test_the_targets_are_judged_on_the_runs_figures() -> None:
    scale = [_run("bulk", "sync", 40.0, 30.0, 300), _run("bulk", "reconciliation", 100.0, 60.0, 3000, throttled=4)]
    before = [_run("before", "sync", 100.0, 100.0, 300), _run("before", "reconciliation", 490.0, 400.0, 3100)]
    executor = [_run("executor", "sync", 50.0, 35.0, 300), _run("executor", "reconciliation", 110.0, 70.0, 3000)]
    tasks = [_task("read_outcomes", 310.0), _task("write_customers", 455.5, 3)]
    small = [_run("bulk", "sync", 4.0, 3.0, 20, n=500), _run("bulk", "reconciliation", 6.0, 5.0, 40, n=500),
             _run("naive", "sync", 40.0, 10.0, 1000, n=500), _run("naive", "reconciliation", 60.0, 20.0, 2800, n=500)]
    lines, figures = targets(scale, before, executor, tasks, small, 100_000, 500)
    assert lines == [
        "PASS  100000 prospects end to end (dags test): 140.0 s (target <= 150 s)",
        "FAIL  100000 prospects end to end (LocalExecutor, parallelism 2): 160.0 s (target <= 150 s)",
        "PASS  throttling failures: 0 (429s received and waited out: 4)",
        "PASS  CPU per prospect: 5.00 ms before, 0.90 ms now: 5.6x lower (target >= 5x)",
        "PASS  requests per prospect: 0.0340 before, 0.0330 now (3400 and 3300)",
        "PASS  largest task's peak RSS: 456 MB, b2b_outcome_reconciliation.write_customers[3] (target <= 500 MB)",
        "PASS  at N = 500, naive / bulk wall: 100.0 s / 10.0 s = 10.0x (target >= 10x)",
    ]
    assert figures["cpu_ratio"] == 5.6 and figures["largest_task"] == "b2b_outcome_reconciliation.write_customers[3]"


def test_a_target_whose_run_was_left_out_is_not_judged_and_a_miss_fails() -> None:
    scale = [_run("bulk", "sync", 100.0, 90.0, 300, failures=1), _run("bulk", "reconciliation", 100.0, 90.0, 3000)]
    lines, figures = targets(scale, [], [], [], [], 100_000, 0)
    assert lines == ["FAIL  100000 prospects end to end (dags test): 200.0 s (target <= 150 s)",
                     "FAIL  throttling failures: 1 (429s received and waited out: 0)"]  # fmt: skip
    assert "cpu_ratio" not in figures and figures["throttle_failures"] == 1


def test_profiling_without_py_spy_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(SystemExit, match="make install"):
        profile.sampled(["true"], tmp_path / "out.txt")
