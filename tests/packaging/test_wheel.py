"""The distribution as a deployment gets it: the wheel built from pyproject.toml, installed into a
clean venv with apache-airflow==3.3.2 and the constraints, no test tools, no fakes. Airflow finds the
provider and the UI plugin there by their entry points alone (no plugins folder, no PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from b2b_onboarding.airflow.provider_info import get_provider_info

REPO = Path(__file__).resolve().parents[2]
DISTRIBUTION = "airflow-provider-d365-b2b-onboarding"


def run(*command: str, env: dict | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built as a deployment builds it: isolated, with the build backend pyproject.toml pins."""
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check", "-w", str(out), str(REPO))
    [built] = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def deployment(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A clean venv with the wheel and Airflow 3.3.2, as the production image installs them; and its Airflow's env."""
    venv = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "apache-airflow==3.3.2", str(wheel),
        "-c", str(REPO / "constraints.txt"))  # fmt: skip
    home = tmp_path_factory.mktemp("airflow-home")
    empty = tmp_path_factory.mktemp("empty")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(empty),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(empty)}  # fmt: skip
    return {"python": python, "airflow": str(venv / "bin" / "airflow"), "env": env}


def airflow_json(deployment: dict, *args: str) -> list[dict]:
    return json.loads(run(deployment["airflow"], *args, "-o", "json", env=deployment["env"]))


def test_the_wheel_holds_the_package_and_its_data_and_nothing_of_the_fakes_or_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {"b2b_onboarding"} <= top and not top & {"d365_fakes", "b2b_drivers", "tests", "dags"}
    assert "b2b_onboarding/airflow/pools.json" in names
    assert any(name.startswith("b2b_onboarding/airflow/ui/templates/") for name in names)
    assert any(name.startswith("b2b_onboarding/airflow/ui/static/") for name in names)
    assert any(name.startswith("b2b_onboarding/store/migrations/versions/") and name.endswith(".py") for name in names)
    entry_points = next(zipfile.ZipFile(wheel).read(name).decode() for name in names if name.endswith("entry_points.txt"))
    assert "[apache_airflow_provider]" in entry_points and "[airflow.plugins]" in entry_points


def test_airflow_lists_the_provider_and_its_connection_types(deployment):
    providers = {row["package_name"]: row for row in airflow_json(deployment, "providers", "list")}
    assert providers[DISTRIBUTION]["version"] == get_provider_info()["versions"][0]
    hooks = {row["connection_type"]: row for row in airflow_json(deployment, "providers", "hooks")}
    declared = get_provider_info()["connection-types"]
    assert {kind["connection-type"] for kind in declared} == {"d365_commerce", "d365_sales", "d365_state"}
    for connection_type in declared:
        row = hooks[connection_type["connection-type"]]
        assert row["class"] == connection_type["hook-class-name"] and row["package_name"] == DISTRIBUTION
        assert row["hook_name"] == connection_type["hook-name"]
    widgets = {row["connection_parameter_name"] for row in airflow_json(deployment, "providers", "widgets")}
    for connection_type in declared:
        prefix = f"extra__{connection_type['connection-type']}__"
        assert {prefix + field for field in connection_type["conn-fields"]} <= widgets
    notifications = json.dumps(airflow_json(deployment, "providers", "notifications"))
    assert "b2b_onboarding.airflow.notifier.TaskFailureNotifier" in notifications


def test_airflow_loads_the_ui_plugin_from_its_entry_point(deployment):
    plugins = {row["name"]: row for row in airflow_json(deployment, "plugins")}
    plugin = plugins["b2b_onboarding"]
    assert DISTRIBUTION in plugin["source"]
    assert "B2B onboarding" in json.dumps(plugin["fastapi_apps"]) and "B2B onboarding" in json.dumps(plugin["external_views"])


def test_the_deployment_has_neither_the_fakes_nor_the_test_tools(deployment):
    probe = "import importlib.util as u; print([m for m in ('d365_fakes', 'b2b_drivers', 'pytest', 'playwright') if u.find_spec(m)])"
    assert run(deployment["python"], "-c", probe, env=deployment["env"]).strip() == "[]"
    pools = run(deployment["python"], "-m", "b2b_onboarding.airflow.pools", env=deployment["env"]).strip()
    assert json.loads(Path(pools).read_text())
