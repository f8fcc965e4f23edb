# The two commands of the README: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False

.PHONY: install demo test airflow e2e-distributed bench profile chaos latency fakes constraints clean

install: $(STAMP)

# The provider package and the fakes, editable (their sources are imported where they are), with the
# test tools; Airflow finds the provider and its UI plugin by their entry points, as in production.
$(STAMP): pyproject.toml fakes/pyproject.toml requirements.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e . -e ./fakes -r requirements-dev.txt -c constraints.txt
	touch $@

demo: install
	$(BIN)/python -m b2b_drivers.demo

test: install
	$(BIN)/python -m pytest

# The next command after `make demo`: Airflow's UI on http://127.0.0.1:8080 with the product and the
# fakes, in the foreground until Ctrl-C (README, "Try it locally"). State and logs in .airflow/.
airflow: install
	$(BIN)/python -m b2b_drivers.local_airflow $(AIRFLOW_ARGS)

# Not part of `make test` (run by .ci/run): the demo's story on CeleryExecutor with two workers, on
# the machine's PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379). Skipped when either is absent,
# unless CI is set. Logs in .artifacts/distributed/.
e2e-distributed: install
	$(BIN)/python -m pytest tests/distributed -m distributed -s

# Not part of `make test`: the flow at 100,000 prospects, beside the product as of BENCH_BEFORE (the last
# commit before the performance work of issue 17), on a real executor with figures per task, and bulk vs
# naive side by side (README, Performance). `make bench BENCH_BEFORE=` runs no before.
BENCH_BEFORE ?= e49e571
bench: install
	$(BIN)/python -m b2b_drivers.bench $(if $(BENCH_BEFORE),--before $(BENCH_BEFORE)) $(BENCH_ARGS)

# Not part of `make test`: where the task processes spend their CPU, sampled by py-spy (README, Performance).
profile: install
	$(BIN)/python -m b2b_drivers.bench --profile --n 20000 --naive-n 0 --no-executor $(PROFILE_ARGS)

# Not part of `make test`: event-driven vs time-based scheduling side by side, two real Airflows against the
# fakes for about 10 minutes: latencies and idle requests, printed and in .latency/results.json.
latency: install
	$(BIN)/python -m b2b_drivers.latency $(LATENCY_ARGS)

# The flow under faults, kills, an overlapping run and a backfill, then its invariants (run by .ci/run).
chaos: install
	$(BIN)/python -m b2b_drivers.chaos $(CHAOS_ARGS)

# Serve the fakes in the foreground, for exploring them by hand.
fakes: install
	$(BIN)/python -m d365_fakes serve --state-dir .fakes --clients .fakes/clients.json

# Regenerate the full pin list from a clean environment built from requirements.txt alone.
constraints:
	rm -rf /tmp/b2b-constraints-venv && $(PYTHON) -m venv /tmp/b2b-constraints-venv
	/tmp/b2b-constraints-venv/bin/pip install --quiet -e . -e ./fakes -r requirements-dev.txt
	/tmp/b2b-constraints-venv/bin/pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf $(VENV) .airflow .fakes .demo .bench .chaos .latency .pytest_cache build fakes/build src/*.egg-info fakes/src/*.egg-info
