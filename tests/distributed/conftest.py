"""tests/distributed: `make e2e-distributed`, deselected from `make test` (pytest.ini: the
`distributed` marker). The fixtures are in deployment.py."""

import pytest

# deployment.py imports tests/e2e/airflow_services.py, a pytest plugin of the e2e tests: its asserts
# are rewritten whichever directory imports it first.
pytest.register_assert_rewrite("airflow_services")

from deployment import broker, databases, distributed  # noqa: E402, F401
