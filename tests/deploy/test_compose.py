"""docker-compose.yaml and its Dockerfile, checked without a Docker engine (README, "Production").

`docker-compose config` (Debian's docker-compose package; .ci/run installs it) validates and
interpolates the file as `docker compose up` would, for production (a tenant's .env) and for the demo
(deploy/demo.env with the demo profile); the result is checked for the topology, the shared secrets,
the connections (no fake defaults in production; the fakes' CA in the demo only), the Airflow settings
(they must exist in Airflow 3.3.2 and its providers) and the pinned images. The Dockerfile's stages are
read statically: the production image is the provider's wheel with its pins, no fakes, no test tools.
airflow-init's script and the demo profile's fakes run natively, as the compose file gives them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml

from b2b_onboarding.airflow.pools import POOLS_FILE

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
DEMO_ENV_FILE = REPO / "deploy" / "demo.env"
AIRFLOW_SERVICES = {
    "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker",
    "airflow-triggerer",
}  # fmt: skip
# The services that call Commerce or Sales: tasks, callbacks, the Test button (not the one-off init).
CALLING_SERVICES = AIRFLOW_SERVICES - {"airflow-init"}
SERVICES = AIRFLOW_SERVICES | {"postgres", "redis"}
# The required variables of .env.example, each with a distinct test value.
SECRETS = {
    "POSTGRES_PASSWORD": "test-postgres-password",
    "AIRFLOW_FERNET_KEY": "dGVzdHMgZmVybmV0IGtleSwgbm90IGEgc2VjcmV0ISE=",  # a valid key: airflow-init runs natively
    "AIRFLOW_JWT_SECRET": "test-jwt-secret",
    "AIRFLOW_API_SECRET_KEY": "test-api-secret-key",
    "AIRFLOW_ADMIN_PASSWORD": "test-admin-password",
    "D365_CLIENT_SECRET": "test-client-secret",
}
TENANT = {
    "D365_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
    "D365_AUTHORITY": "https://login.microsoftonline.com/66666666-7777-8888-9999-000000000000",
    "D365_COMMERCE_URL": "https://contoso.operations.dynamics.com",
    "D365_SALES_URL": "https://contoso.crm.dynamics.com",
    "D365_LEGAL_ENTITIES": "usrt,usmf,demf",
    "D365_CUSTOMER_GROUP": "B2B",
}
COMPOSE_PORTS = {"entra": 8441, "commerce": 8442, "dataverse": 8443}  # the fakes' defaults
SHARED_SETTINGS = (
    "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    # The dag-processor parses the schedules this chooses, the triggerer runs their triggers.
    "AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING", "AIRFLOW__D365_B2B_ONBOARDING__POLL_INTERVAL_S",
)  # fmt: skip


@pytest.fixture(scope="module")
def compose_binary() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        message = "docker-compose is not installed (apt-get install docker-compose; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def tenant_env_file(tmp_path: Path, variables: dict[str, str]) -> Path:
    """A production .env with `variables`; compose also passes it to the Airflow containers."""
    env_file = tmp_path / "compose.env"
    lines = {"ENV_FILE_PATH": str(env_file)} | variables
    env_file.write_text("".join(f"{name}={value}\n" for name, value in lines.items()))
    return env_file


def compose_config(binary: str, tmp_path: Path, env_file: Path, *options: str) -> subprocess.CompletedProcess:
    """`docker-compose [options] config` with `env_file` as the .env file, nothing else from this
    process's environment (the test process sets AIRFLOW_* variables of its own)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    command = [binary, "--project-directory", str(REPO), "--file", str(COMPOSE_FILE),
               "--env-file", str(env_file), *options, "config"]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def parsed_config(binary: str, tmp_path: Path, env_file: Path, *options: str) -> dict:
    result = compose_config(binary, tmp_path, env_file, *options)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture
def production(compose_binary: str, tmp_path: Path) -> dict:
    return parsed_config(compose_binary, tmp_path, tenant_env_file(tmp_path, SECRETS | TENANT))


@pytest.fixture
def demo(compose_binary: str, tmp_path: Path) -> dict:
    """The README's demo command: `docker compose --env-file deploy/demo.env --profile demo up`."""
    return parsed_config(compose_binary, tmp_path, DEMO_ENV_FILE, "--profile", "demo")


def environment(config: dict, service: str) -> dict[str, str]:
    return {name: str(value) for name, value in config["services"][service]["environment"].items()}


def mounts(config: dict, service: str) -> dict[str, tuple[str, str]]:
    """The service's volumes as {target: (source, mode)}; docker-compose 1.29 prints the short syntax."""
    parsed = {}
    for volume in config["services"][service].get("volumes", []):
        source, target, *mode = volume.split(":")
        parsed[target] = (source, mode[0] if mode else "rw")
    return parsed


def connection(config: dict, service: str, conn_id: str) -> dict:
    return json.loads(environment(config, service)[f"AIRFLOW_CONN_{conn_id.upper()}"])


def test_production_has_the_celery_topology_and_no_fakes(production: dict) -> None:
    # `config` lists profiled services too (docker-compose 1.29); `up` without a profile skips them.
    unprofiled = {name for name, service in production["services"].items() if not service.get("profiles")}
    assert unprofiled == SERVICES
    for name in SERVICES:
        assert "fakes" not in production["services"][name].get("depends_on", {}), name


def test_the_demo_profile_adds_the_fakes(demo: dict) -> None:
    assert set(demo["services"]) == SERVICES | {"fakes"}
    assert demo["services"]["fakes"]["profiles"] == ["demo"]


@pytest.mark.parametrize("missing", sorted(SECRETS | TENANT))
def test_each_secret_and_tenant_variable_is_required(compose_binary: str, tmp_path: Path, missing: str) -> None:
    for value in (None, ""):  # unset, or left empty as in .env.example
        variables = {name: given for name, given in (SECRETS | TENANT).items() if name != missing}
        if value is not None:
            variables[missing] = value

        result = compose_config(compose_binary, tmp_path, tenant_env_file(tmp_path, variables))

        assert result.returncode != 0, f"{missing}={value!r} accepted"
        assert f"set {missing} in .env" in result.stderr


def test_no_production_connection_has_a_default(production: dict) -> None:
    """A forgotten tenant variable fails `up` instead of pointing a connection somewhere (the demo's
    fakes, as this file once did). The only default is the CA bundle's: empty, the system trust store."""
    interpolations = re.findall(r"\$\{(D365_\w+)(?::?([-?])([^}]*))?\}", COMPOSE_FILE.read_text())
    assert {name for name, *_ in interpolations} >= set(TENANT) | {"D365_CLIENT_SECRET", "D365_CA_BUNDLE"}
    defaults = {(name, default) for name, kind, default in interpolations if kind != "?"}
    assert defaults == {("D365_CA_BUNDLE", ""), ("D365_CA_VOLUME", "no-extra-ca")}
    for conn_id in ("d365_commerce", "d365_sales"):
        text = json.dumps(connection(production, "airflow-worker", conn_id))
        assert "fakes" not in text, text


def test_every_airflow_service_shares_one_set_of_secrets(production: dict) -> None:
    settings = {service: {name: environment(production, service).get(name) for name in SHARED_SETTINGS}
                for service in AIRFLOW_SERVICES}  # fmt: skip
    first = settings["airflow-apiserver"]
    assert all(value for value in first.values()), first
    assert all(each == first for each in settings.values())
    assert first["AIRFLOW__CORE__FERNET_KEY"] == SECRETS["AIRFLOW_FERNET_KEY"]
    assert first["AIRFLOW__API_AUTH__JWT_SECRET"] == SECRETS["AIRFLOW_JWT_SECRET"]
    assert first["AIRFLOW__API__SECRET_KEY"] == SECRETS["AIRFLOW_API_SECRET_KEY"]


def test_dags_are_mounted_and_the_product_comes_from_the_image_alone(production: dict, demo: dict) -> None:
    """The package is installed in the image and found by its entry points: no plugins folder, no
    PYTHONPATH (which would shadow the installed package with whatever a checkout holds)."""
    for config in (production, demo):
        for service in AIRFLOW_SERVICES:
            service_mounts = mounts(config, service)
            assert service_mounts["/opt/airflow/dags"] == (str(REPO / "dags"), "ro"), service
            assert "/opt/airflow/plugins" not in service_mounts, service
        for name in config["services"]:
            assert "PYTHONPATH" not in config["services"][name].get("environment", {}), name
    for path in (DOCKERFILE, REPO / ".env.example", DEMO_ENV_FILE):
        assert "PYTHONPATH" not in path.read_text(), path


def fakes_state_volume(demo: dict) -> tuple[str, str]:
    """The volume the fakes write their state to (ca.pem among it), and its path in their container."""
    fakes = demo["services"]["fakes"]
    (state_dir,) = [arg.removeprefix("--state-dir=") for arg in fakes["command"] if arg.startswith("--state-dir=")]
    (volume,) = [source for target, (source, _) in mounts(demo, "fakes").items() if target == state_dir]
    assert volume in demo["volumes"], f"{volume} is not a named volume"
    return volume, state_dir


def test_the_fakes_ca_reaches_the_airflow_services_in_the_demo_only(production: dict, demo: dict) -> None:
    volume, _ = fakes_state_volume(demo)
    for service in CALLING_SERVICES:
        in_demo = {source: (target, mode) for target, (source, mode) in mounts(demo, service).items()}
        assert volume in in_demo, f"{service}: the demo's connections name a CA it cannot read"
        ca_dir, mode = in_demo[volume]
        assert mode == "ro", service
        for conn_id in ("d365_commerce", "d365_sales"):
            assert connection(demo, service, conn_id)["extra"]["ca_bundle"] == f"{ca_dir}/ca.pem", (service, conn_id)
    for service in AIRFLOW_SERVICES:
        sources = {source for source, _ in mounts(production, service).values()}
        assert volume not in sources, f"{service} mounts the fakes' volume in production"
        for conn_id in ("d365_commerce", "d365_sales"):
            assert connection(production, service, conn_id)["extra"]["ca_bundle"] == "", (service, conn_id)


def test_the_connection_test_button_is_enabled(production: dict) -> None:
    for service in ("airflow-apiserver", "airflow-worker"):  # the api-server tests, or a worker (enqueued tests)
        assert environment(production, service)["AIRFLOW__CORE__TEST_CONNECTION"] == "Enabled", service


def test_the_worker_runs_celery_with_the_redis_broker(production: dict) -> None:
    worker = production["services"]["airflow-worker"]
    env = environment(production, "airflow-worker")

    assert worker["command"] == "celery worker"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert re.fullmatch(r"redis://redis:6379/\d+", env["AIRFLOW__CELERY__BROKER_URL"])
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_every_database_url_names_a_driver_the_image_installs(production: dict) -> None:
    """SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3, which the pins do not install: a bare
    `postgresql://` (as in Airflow's own compose file's `db+postgresql://` result backend) makes the
    Celery workers crash at start. Creating an engine imports the driver, without connecting."""
    env = environment(production, "airflow-worker")
    state = json.loads(env["AIRFLOW_CONN_D365_STATE"])
    urls = {
        "metadata": env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
        "celery results": env["AIRFLOW__CELERY__RESULT_BACKEND"].removeprefix("db+"),
        "state store": f"{state['extra']['driver']}://{state['login']}@{state['host']}:{state['port']}/{state['schema']}",
    }
    for name, url in urls.items():
        sa.create_engine(url).dispose()  # ModuleNotFoundError when the driver is not installed
        assert sa.make_url(url).get_driver_name() == "psycopg2", name


def test_the_state_store_has_its_own_database_created_and_migrated_by_airflow_init(production: dict) -> None:
    env = environment(production, "airflow-scheduler")
    metadata = sa.make_url(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    state = json.loads(env["AIRFLOW_CONN_D365_STATE"])

    assert state["extra"]["driver"] == "postgresql+psycopg2"
    assert (state["host"], state["port"]) == (metadata.host, metadata.port) == ("postgres", 5432)
    assert state["schema"] and state["schema"] != metadata.database
    steps = init_script(production).splitlines()
    order = [steps.index(step) for step in ("python /opt/airflow/deploy/create_state_database.py", "airflow db migrate",
                                            "python -m b2b_onboarding.airflow.store_migrate")]  # fmt: skip
    assert order == sorted(order), steps  # the store is migrated once its database exists
    for service in AIRFLOW_SERVICES - {"airflow-init"}:
        depends_on = production["services"][service]["depends_on"]
        assert depends_on["airflow-init"]["condition"] == "service_completed_successfully", service


def init_script(config: dict) -> str:
    """airflow-init's bash script, as the container runs it (`config` prints a `$` as `$$`)."""
    init = config["services"]["airflow-init"]
    assert init["entrypoint"] in ("/bin/bash", ["/bin/bash"])
    flag, script = init["command"]
    assert flag == "-c"
    return script.replace("$$", "$")


def test_airflow_init_runs_natively_with_the_compose_environment(production: dict, tmp_path: Path) -> None:
    """airflow-init's script with its environment, the compose network's addresses made local: a fresh
    metadata database migrated, the store migrated, the pools the package ships imported, the password
    written. The image's paths are the repository's: deploy/ is copied into the image as it is."""
    import airflow

    from b2b_onboarding.store import state

    script = init_script(production).replace("/opt/airflow/deploy/", f"{REPO}/deploy/")
    metadata_db, state_db = tmp_path / "airflow.db", tmp_path / "state.db"
    passwords = tmp_path / "auth" / "passwords.json"
    local = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{metadata_db}",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+sqlite:///{metadata_db}",
        "AIRFLOW_CONN_D365_STATE": json.dumps({"conn_type": "sqlite", "schema": str(state_db)}),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
    }
    env = environment(production, "airflow-init") | local
    for name, value in env.items():  # nothing left that only exists in the containers
        assert name in local or not re.search(r"/opt/airflow|@postgres:|\"postgres\"", value), name
    # The venv's `python` and `airflow`, as the image's; its own Airflow home, never the suite's.
    env |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path),
            "AIRFLOW_HOME": str(tmp_path / "airflow-home")}  # fmt: skip

    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.rstrip().endswith(airflow.__version__)  # `airflow version`, the script's last step
    with sa.create_engine(f"sqlite:///{metadata_db}").connect() as connection:
        pools = dict(connection.execute(sa.text("SELECT pool, slots FROM slot_pool")).all())
    assert pools.items() >= {name: spec["slots"] for name, spec in json.loads(POOLS_FILE.read_text()).items()}.items()
    store_tables = set(sa.inspect(sa.create_engine(f"sqlite:///{state_db}")).get_table_names())
    assert set(state.metadata.tables) <= store_tables, "the state store was not migrated"
    assert json.loads(passwords.read_text()) == {"admin": SECRETS["AIRFLOW_ADMIN_PASSWORD"]}
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o600


def test_the_connections_name_the_tenant_from_the_environment(production: dict) -> None:
    from b2b_onboarding.clients.settings import ServiceSettings

    env = environment(production, "airflow-worker")
    for conn_id, resource in (("d365_commerce", TENANT["D365_COMMERCE_URL"]), ("d365_sales", TENANT["D365_SALES_URL"])):
        conn = json.loads(env[f"AIRFLOW_CONN_{conn_id.upper()}"])
        settings = ServiceSettings.from_connection(conn_id, conn["host"], conn["login"], conn["password"], conn["extra"])
        assert settings.resource == resource
        assert settings.authority == TENANT["D365_AUTHORITY"]
        assert settings.client_id == TENANT["D365_CLIENT_ID"]
        assert settings.client_secret.get_secret_value() == SECRETS["D365_CLIENT_SECRET"]
        assert settings.verify is True  # the system trust store, not the demo's CA
    commerce = json.loads(env["AIRFLOW_CONN_D365_COMMERCE"])
    settings = ServiceSettings.from_connection("d365_commerce", commerce["host"], "x", "y", commerce["extra"])
    assert (settings.legal_entities, settings.customer_group) == (("usrt", "usmf", "demf"), "B2B")
    sales = json.loads(env["AIRFLOW_CONN_D365_SALES"])
    assert "customer_group" not in sales["extra"]  # the Sales connection needs none


def airflow_settings(config: dict) -> set[tuple[str, str]]:
    return {
        (section.lower(), key.lower())
        for service in config["services"].values()
        for name in service.get("environment", {})
        if (match := re.fullmatch(r"AIRFLOW__([A-Z0-9_]+?)__([A-Z0-9_]+)", name))
        for section, key in [match.groups()]
    }


def test_every_airflow_setting_exists_in_airflow_and_its_providers(demo: dict) -> None:
    import airflow
    from airflow.configuration import conf
    from airflow.providers_manager import ProvidersManager

    known = {(section, key) for section, spec in conf.configuration_description.items() for key in spec["options"]}
    for _provider, sections in ProvidersManager().provider_configs:
        known |= {(section, key) for section, spec in sections.items() for key in spec["options"]}

    used = airflow_settings(demo)

    assert ("celery", "broker_url") in used
    unknown = used - known
    assert not unknown, (
        f"not settings of Airflow {airflow.__version__} or its installed providers: "
        f"{sorted(unknown)} (a [celery] setting needs apache-airflow-providers-celery in requirements.txt)"
    )


def test_every_image_is_pinned(demo: dict) -> None:
    for name, service in demo["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag != "latest", f"{name}: {image} has no pinned tag"
        # At least major.minor: a bare major tag ("16", "7") moves with every release.
        assert re.match(r"\d+\.\d+", tag), f"{name}: {image} is not pinned to a release"
        if "build" in service:
            assert tag.startswith(f"{airflow_version_of_dockerfile()}-"), f"{name}: {image} does not name its Airflow"


# --- the Dockerfile's stages, read statically ------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def copies(self) -> list[tuple[str | None, list[str], str]]:
        """Each COPY's stage it copies from (None: the build context), sources and destination."""
        found = []
        for keyword, arguments in self.instructions:
            if keyword == "COPY":
                words = arguments.split()
                flags = dict(word.removeprefix("--").split("=", 1) for word in words if word.startswith("--"))
                *sources, destination = [word for word in words if not word.startswith("--")]
                found.append((flags.get("from"), sources, destination))
        return found


def dockerfile_stages() -> list[Stage]:
    stages: list[Stage] = []
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, arguments = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", arguments.strip(), flags=re.IGNORECASE)
            assert match, line
            stages.append(Stage(match.group(2) or str(len(stages)), match.group(1)))
        else:
            stages[-1].instructions.append((keyword.upper(), " ".join(arguments.split())))
    return stages


def image_stages(target: str) -> list[Stage]:
    """The stages an image is made of: its own, those it is built FROM and those it copies from."""
    stages = {stage.name: stage for stage in dockerfile_stages()}
    made_of: list[Stage] = []

    def visit(name: str) -> None:
        stage = stages[name]
        if stage not in made_of:
            made_of.append(stage)
            for source in ([stage.base] if stage.base in stages else []) + [s for s, *_ in stage.copies() if s]:
                assert source in stages, f"{name} copies from {source}, not a stage of the Dockerfile"
                visit(source)

    visit(target)
    return made_of


def airflow_version_of_dockerfile() -> str:
    stages = dockerfile_stages()
    (base,) = {stage.base for stage in stages} - {stage.name for stage in stages}  # one image from outside
    match = re.fullmatch(r"apache/airflow:(\d+\.\d+\.\d+)-python3\.11", base)
    assert match, f"the Dockerfile's base {base} is not apache/airflow:<x.y.z>-python3.11 (constraints.txt is for 3.11)"
    return match.group(1)


def test_compose_builds_the_production_image_for_airflow_and_the_demo_image_for_the_fakes(demo: dict) -> None:
    stages = dockerfile_stages()
    assert stages[-1].name == "production", "a plain `docker build .` must make the production image"
    builds = {name: (service["build"]["target"], service["image"]) for name, service in demo["services"].items()
              if "build" in service}  # fmt: skip
    assert {name: target for name, (target, _) in builds.items()} == dict.fromkeys(AIRFLOW_SERVICES, "production") | {
        "fakes": "demo"
    }
    # One image name per target: otherwise one build would overwrite the other's tag.
    images = {target: {image for each, image in builds.values() if each == target} for target in ("production", "demo")}
    assert len(images["production"]) == len(images["demo"]) == 1 and images["production"] != images["demo"], images


def requirement_names(path: Path) -> set[str]:
    return {re.split(r"[=<>~!\[ ;]", line.strip())[0].lower() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-"))}  # fmt: skip


def test_the_production_image_is_the_wheel_with_its_pins_without_fakes_or_test_tools() -> None:
    made_of = image_stages("production")
    instructions = "\n".join(f"{keyword} {arguments}" for stage in made_of for keyword, arguments in stage.instructions)
    for absent in ("fakes", "requirements-dev", "pytest", "playwright", "PYTHONPATH", "pip install -e", "--editable"):
        assert absent not in instructions, f"the production image's stages mention {absent}"
    context = {source for stage in made_of for origin, sources, _ in stage.copies() if origin is None
               for source in sources}  # fmt: skip
    assert context == {"pyproject.toml", "README.md", "src", "requirements.txt", "constraints.txt",
                       "deploy/create_state_database.py", "deploy/write_admin_password.py"}  # fmt: skip
    # The wheel is built from the package's sources alone, then installed (not the source tree).
    production = made_of[0]
    ((wheel_stage, (built,), wheels),) = [copy for copy in production.copies() if copy[0]]
    builder = next(stage for stage in made_of if stage.name == wheel_stage)
    assert {source for _, sources, _ in builder.copies() for source in sources} == {"pyproject.toml", "README.md",
                                                                                   "src"}  # fmt: skip
    assert any(keyword == "RUN" and f"pip wheel --no-cache-dir --no-deps --wheel-dir {built} " in arguments
               for keyword, arguments in builder.instructions)  # fmt: skip
    (install,) = [arguments for keyword, arguments in production.instructions
                  if keyword == "RUN" and "pip install" in arguments]  # fmt: skip
    assert install.startswith(f'pip install --no-cache-dir "apache-airflow==${{AIRFLOW_VERSION}}" {wheels}/*.whl ')
    assert re.search(r"-r \S*/requirements\.txt -c \S*/constraints\.txt$", install)
    # Nothing the production pins pull in is a test tool: those are requirements-dev.txt's alone.
    test_tools = requirement_names(REPO / "requirements-dev.txt")
    assert {"pytest", "playwright"} <= test_tools
    production_requirements = requirement_names(REPO / "requirements.txt")
    assert not production_requirements & test_tools
    assert not any(line.startswith("-") for line in (REPO / "requirements.txt").read_text().splitlines())
    package = [re.split(r"[=<>~!\[ ;]", dep)[0].lower() for dep in pyproject()["project"]["dependencies"]]
    assert not set(package) & test_tools


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_image_installs_the_pinned_requirements_on_the_same_airflow() -> None:
    import airflow

    version = airflow_version_of_dockerfile()

    assert version == airflow.__version__  # the Airflow this suite (and make install) runs
    assert f"apache-airflow=={version}" in pyproject()["project"]["dependencies"], "the package pins another Airflow"
    assert f"apache-airflow=={version}\n" in (REPO / "constraints.txt").read_text(), "constraints.txt: another Airflow"


DOCKER_WILDCARDS = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}  # `**` spans directories


def docker_ignores(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context, as Docker decides: the last pattern
    that matches the path or one of its parent directories wins; `!` lets it back in."""
    ignored = False
    parents = ["/".join(path.split("/")[: depth + 1]) for depth in range(path.count("/") + 1)]
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.removeprefix("!").strip("/"))
        glob = "".join(DOCKER_WILDCARDS.get(part, re.escape(part)) for part in parts)
        if any(re.fullmatch(glob, parent) for parent in parents):
            ignored = not pattern.startswith("!")
    return ignored


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    copied = {source for stage in dockerfile_stages() for origin, sources, _ in stage.copies() if origin is None
              for source in sources}  # fmt: skip
    sources = [path.relative_to(REPO).as_posix() for source in copied for path in [REPO / source]
               for path in ([path] if path.is_file() else path.rglob("*.py"))]  # fmt: skip
    assert "src/b2b_onboarding/airflow/pools.py" in sources and "fakes/src/d365_fakes/__main__.py" in sources
    for path in sources + ["src/b2b_onboarding/airflow/pools.json", "fakes/src/d365_fakes/CONTRACT.md"]:
        assert not docker_ignores(path), f"{path} is not in the build context"
    for path in (".env", ".venv/bin/python", "tests/conftest.py", "dags/b2b_prospect_sync.py", "requirements-dev.txt",
                 ".git/config", "deploy/demo.env", "src/b2b_onboarding/__pycache__/errors.cpython-311.pyc",
                 "src/airflow_provider_d365_b2b_onboarding.egg-info/PKG-INFO", "fakes/src/d365_fakes.egg-info/PKG-INFO"):
        assert docker_ignores(path), f"{path} would be sent to the image build"


# --- the demo profile's fakes, run natively as the compose file gives them ------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_demo_connections_authenticate_against_the_demo_fakes(demo: dict, tmp_path: Path) -> None:
    """The `fakes` service's command (its tenant, app registration, host and certificate names) with
    the connections the Airflow services get from deploy/demo.env, trusting the CA the fakes write to
    the volume both mount: tokens for both APIs, and the seeded prospects."""
    from b2b_onboarding.clients.auth import token_provider
    from b2b_onboarding.clients.settings import ServiceSettings

    fakes = demo["services"]["fakes"]
    state_dir = tmp_path / "d365-fakes"
    ports = {"entra": free_port(), "commerce": free_port(), "dataverse": free_port()}
    # Natively there is no compose network: the service name is `localhost`, the volume a directory
    # (where the fakes mount it, and where the Airflow worker does).
    volume, fakes_dir = fakes_state_volume(demo)
    (worker_dir,) = [target for target, (source, _) in mounts(demo, "airflow-worker").items() if source == volume]

    def native(text: str) -> str:
        for service, port in ports.items():
            text = text.replace(f"fakes:{COMPOSE_PORTS[service]}", f"localhost:{port}")
        return text.replace(fakes_dir, str(state_dir)).replace(worker_dir, str(state_dir))

    command = [native(arg) for arg in fakes["entrypoint"] + fakes["command"]]
    assert "--public-host=fakes" in fakes["command"]
    command = [arg.replace("--public-host=fakes", "--public-host=localhost") for arg in command]
    command += [f"--{service}-port={port}" for service, port in ports.items()]
    # The fakes' distribution is installed in the venv, as in the demo image: no PYTHONPATH.
    env = {"PATH": os.environ["PATH"], "D365_FAKES_CLIENTS": environment(demo, "fakes")["D365_FAKES_CLIENTS"]}
    assert command[0] == "python"
    with subprocess.Popen([sys.executable, *command[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as world:  # fmt: skip
        try:
            seeded = wait_for_line(world, "demo-world: seeded")
            assert "seeded 50 Pending B2B prospects in usrt, usmf" in seeded
            airflow_env = environment(demo, "airflow-worker")
            settings = {}
            for conn_id in ("d365_commerce", "d365_sales"):
                conn = json.loads(native(airflow_env[f"AIRFLOW_CONN_{conn_id.upper()}"]))
                settings[conn_id] = ServiceSettings.from_connection(conn_id, conn["host"], conn["login"],
                                                                    conn["password"], conn["extra"])  # fmt: skip
            assert settings["d365_commerce"].verify == str(state_dir / "ca.pem")  # the fakes' CA, written by them
            assert settings["d365_commerce"].legal_entities == ("usrt", "usmf")
            assert settings["d365_commerce"].customer_group == "10"  # in every legal entity of the fakes
            with httpx.Client(verify=settings["d365_commerce"].verify, timeout=30) as http:
                for conn_id, path in (("d365_commerce", "/data/Prospects?cross-company=true&$count=true&$top=1"),
                                      ("d365_sales", "/api/data/v9.2/WhoAmI")):  # fmt: skip
                    service = settings[conn_id]
                    tokens = token_provider(service.authority, service.client_id,
                                            service.client_secret.get_secret_value(), service.verify)  # fmt: skip
                    answer = http.get(service.resource + path,
                                      headers={"Authorization": f"Bearer {tokens.token(service.scope)}"})  # fmt: skip
                    assert answer.status_code == 200, f"{conn_id}: {answer.status_code} {answer.text}"
                    if conn_id == "d365_commerce":
                        assert answer.json()["@odata.count"] == 50
        finally:
            world.terminate()
            output = world.communicate(timeout=30)[0]
    assert world.returncode == 0, output


def wait_for_line(process: subprocess.Popen, prefix: str, timeout_s: float = 60) -> str:
    """The first line of the process's output that starts with `prefix`."""
    import selectors

    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen = []
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=1):
                line = process.stdout.readline()
                if not line:
                    break
                seen.append(line)
                if line.startswith(prefix):
                    return line
    pytest.fail(f"no line starting {prefix!r} within {timeout_s} s; output:\n{''.join(seen)}")


def test_runs_are_event_driven_with_a_triggerer_unless_the_env_chooses_time(production: dict, compose_binary: str,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    """Events by default (README, "When runs start"), which needs the triggerer; `B2B_SCHEDULING=time`
    in .env switches every Airflow process to the crons at once."""
    assert production["services"]["airflow-triggerer"]["command"] == "triggerer"
    assert {environment(production, service)["AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING"]
            for service in AIRFLOW_SERVICES} == {"events"}  # fmt: skip
    timed = parsed_config(compose_binary, tmp_path, tenant_env_file(tmp_path, SECRETS | TENANT | {"B2B_SCHEDULING": "time"}))
    assert {environment(timed, service)["AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING"]
            for service in AIRFLOW_SERVICES} == {"time"}  # fmt: skip
