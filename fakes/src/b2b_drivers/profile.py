"""`make profile` (`make bench` with `--profile`): where the task processes spend their CPU.

Each `airflow dags test` of the bench runs under py-spy (a sampling profiler from PyPI: it reads the
process from outside, so the product runs unchanged), which writes its samples as collapsed stacks;
`top_functions` turns them into the functions with the most inclusive CPU (a function counts in every
sample where it is on the stack, once), and `by_process` into the share of each process sampled.
py-spy counts a thread only while it runs (or waits for a core), not while it waits on a socket or a
lock: the samples are the time spent computing, close to CPU time on a machine with a core to spare.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

RATE_HZ = 100
STARTED = "(the command sampled)"  # the process py-spy started, as `Sample.process` names it
# `process 123:"python -m airflow dags test ...";frame;frame;... 7`; a frame is `function (file:line)`.
_SAMPLE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$", re.DOTALL)
_PROCESS = re.compile(r'^process (?P<pid>\d+):"(?P<command>.*)"$', re.DOTALL)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")
# Paths shown from the package down: `b2b_onboarding/clients/batch.py`, `email/parser.py`.
_PACKAGES = (re.compile(r"^.*/(?:site-packages|src)/"), re.compile(r"^.*/lib/python3\.\d+/"))


def py_spy() -> str:
    """The py-spy executable installed beside this Python (requirements-dev.txt)."""
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit("py-spy is not installed in this environment: run `make install`")
    return found


def sampled(command: list[str], output: Path) -> list[str]:
    """`command` run under py-spy, with its subprocesses, writing collapsed stacks to `output`."""
    return [py_spy(), "record", "--format", "raw", "--rate", str(RATE_HZ), "--subprocesses", "--nonblocking",
            "--output", str(output), "--", *command]  # fmt: skip


@dataclass(frozen=True)
class Sample:
    process: str  # the command line of the sampled process, or STARTED
    frames: tuple[str, ...]  # outermost first, each "function (short/path.py)"
    count: int


def read_samples(path: Path) -> list[Sample]:
    samples, pending = [], ""
    for line in path.read_text(errors="replace").splitlines():
        # A command line may hold line breaks (`python -c` with a script): a record ends on a line that
        # closes every quote it opened and ends with its count.
        pending = f"{pending}\n{line}" if pending else line
        matched = _SAMPLE.match(pending)
        if matched is None or pending.count('"') % 2:
            continue
        pending = ""
        frames = matched["stack"].split(";")
        # A subprocess's stack is prefixed by its ancestors': the sampled process is the last one named,
        # the one py-spy started the first (named STARTED: py-spy may not have read its command line).
        commands = []
        while frames and (process := _PROCESS.match(frames[0])):
            commands, frames = [*commands, process["command"]], frames[1:]
        command = commands[-1] if len(commands) > 1 else STARTED
        samples.append(Sample(command, tuple(_frame(frame) for frame in frames), int(matched["count"])))
    return samples


def _frame(frame: str) -> str:
    matched = _FRAME.match(frame)
    if matched is None:
        return frame
    path = matched["file"]
    for package in _PACKAGES:
        path, found = package.subn("", path, count=1)
        if found:
            break
    return f"{matched['function']} ({path})"


# Plumbing on the path of whatever runs in a thread, a module or an Airflow task: shown, it would head
# every table (the time of the functions it calls is counted in them).
_PLUMBING = re.compile(
    r"\((threading\.py|concurrent/futures/thread\.py|<frozen runpy>|airflow/__main__\.py|airflow/cli/.*"
    r"|airflow/utils/(cli|session|providers_configuration_loader)\.py|airflow/sdk/bases/(operator|decorator)\.py"
    r"|airflow/sdk/execution_time/(task_runner|callback_runner)\.py|airflow/providers/standard/operators/python\.py"
    r"|standard/operators/python\.py)\)$"
)


def top_functions(samples: Iterable[Sample], limit: int = 25) -> list[tuple[str, float, float]]:
    """(function, inclusive %, self %) of the `limit` functions with the most inclusive samples, but
    the plumbing of threads, modules and Airflow's task runner."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for sample in samples:
        total += sample.count
        for frame in set(sample.frames):
            inclusive[frame] += sample.count
        if sample.frames:
            own[sample.frames[-1]] += sample.count
    if not total:
        return []
    shown = [(frame, count) for frame, count in inclusive.most_common() if not _PLUMBING.search(frame)][:limit]
    return [(frame, 100 * count / total, 100 * own[frame] / total) for frame, count in shown]


def by_process(samples: Iterable[Sample]) -> Counter[str]:
    """Samples per process command line."""
    counts: Counter[str] = Counter()
    for sample in samples:
        counts[sample.process] += sample.count
    return counts


def table(samples: list[Sample], title: str, limit: int = 25) -> str:
    """The top functions of `samples` as a fixed-width table, headed by their CPU seconds."""
    seconds = sum(sample.count for sample in samples) / RATE_HZ
    rows = [f"{title}: {seconds:.1f} CPU s sampled at {RATE_HZ} Hz; top {limit} functions by inclusive CPU",
            f"{'incl %':>7} {'self %':>7}  function (file)"]  # fmt: skip
    rows += [f"{incl:7.1f} {own:7.1f}  {frame}" for frame, incl, own in top_functions(samples, limit)]
    return "\n".join(rows)
