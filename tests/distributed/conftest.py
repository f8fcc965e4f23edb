"""tests/distributed: `make e2e-distributed`, deselected from `make test` (pytest.ini: the
`distributed` marker). The fixtures are in deployment.py."""

from deployment import broker, databases, distributed  # noqa: F401
