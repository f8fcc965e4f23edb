"""The package's folders are its layers (README, Layout): each module imports only its own layer and
those below it, only the Airflow glue imports Airflow, and the fakes stay a black box to the product."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import b2b_onboarding
import d365_fakes

PACKAGE = Path(b2b_onboarding.__file__).parent
# Bottom to top; the modules at the package's root are the base every layer shares.
LAYERS = {"errors": 0, "redaction": 0, "domain": 1, "clients": 2, "store": 3, "flow": 4, "airflow": 5}
CORE = ("domain", "clients", "store", "flow")


def layer_of(module: str) -> str:
    return module.split(".")[1].removesuffix(".py")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, function-level imports included; `from a import b` counts as a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def modules(package: Path) -> dict[str, Path]:
    return {".".join(path.relative_to(package.parent).with_suffix("").parts): path for path in package.rglob("*.py")}


PRODUCT = {name: path for name, path in modules(PACKAGE).items() if name.count(".") >= 1 and not name.endswith("__init__")}


def test_every_module_sits_in_a_layer():
    assert PRODUCT and {layer_of(name) for name in PRODUCT} <= set(LAYERS)
    assert {path.stem for path in PACKAGE.glob("*.py")} <= {"__init__", *LAYERS}


@pytest.mark.parametrize("module", sorted(PRODUCT))
def test_a_module_imports_no_layer_above_its_own(module):
    own = LAYERS[layer_of(module)]
    above = sorted(name for name in imports(PRODUCT[module])
                   if name.startswith("b2b_onboarding.") and LAYERS.get(layer_of(name), -1) > own)  # fmt: skip
    assert above == [], f"{module} (layer {layer_of(module)}) imports {above}"


@pytest.mark.parametrize("module", sorted(PRODUCT))
def test_only_the_airflow_glue_imports_airflow_and_nothing_imports_the_fakes(module):
    found = imports(PRODUCT[module])
    if layer_of(module) != "airflow":
        assert sorted(name for name in found if name.split(".")[0] == "airflow") == []
    assert sorted(name for name in found if name.split(".")[0] in ("d365_fakes", "b2b_drivers")) == []


def test_the_core_imports_and_runs_without_airflow():
    """Importing every module of the core leaves Airflow unloaded: it can be tested, and used, without it."""
    core = sorted(name for name in PRODUCT if (layer_of(name) in CORE or layer_of(name) in ("errors", "redaction"))
                  and not name.startswith("b2b_onboarding.store.migrations."))  # Alembic runs those, in its context
    probe = f"import importlib, json, sys\nfor name in {core!r}: importlib.import_module(name)\n" \
            "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] == 'airflow')))"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_fakes_know_nothing_of_the_product():
    """The fakes are Microsoft's services as a black box: they import none of the product."""
    fakes = Path(d365_fakes.__file__).parent
    leaks = sorted(f"{path.name}: {name}" for path in fakes.rglob("*.py") for name in imports(path)
                   if name.split(".")[0] in ("b2b_onboarding", "b2b_drivers"))  # fmt: skip
    assert leaks == []
