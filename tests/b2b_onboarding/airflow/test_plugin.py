"""The UI plugin: Airflow finds it by the package's `airflow.plugins` entry point (Airflow's plugins
folder holds none of the product's code), and importing it stays cheap, since every Airflow process
imports the plugins, each task's process too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[3] / "plugins"


def test_the_plugins_folder_holds_no_python():
    """Airflow imports every .py file of its plugins folder as a top-level module, in every process."""
    assert not list(PLUGINS.rglob("*.py"))


def test_a_task_process_loads_the_plugin_without_building_the_app(tmp_path):
    """As a task does (the Task SDK's plugins manager): the plugin loads, FastAPI and pandas stay unloaded."""
    script = """
import json, sys
from airflow.sdk import plugins_manager
plugins, errors = plugins_manager._get_plugins()
print(json.dumps({"plugins": [p.name for p in plugins], "sources": [str(p.source) for p in plugins], "errors": errors,
                  "loaded": sorted(m for m in ("fastapi", "pandas", "b2b_onboarding.airflow.ui.app", "b2b_onboarding.store.state")
                                   if m in sys.modules)}))
"""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["plugins"] == ["b2b_onboarding"] and loaded["errors"] == {}
    assert "airflow-provider-d365-b2b-onboarding" in loaded["sources"][0]  # the entry point's distribution
    assert loaded["loaded"] == []


def test_the_lazy_app_builds_the_app_once():
    from b2b_onboarding.airflow.ui import LazyApp

    lazy = LazyApp()
    assert lazy.app is lazy.app and type(lazy.app).__name__ == "FastAPI"
