"""docker-compose.yaml and its Dockerfile, checked without a Docker engine (README, "Production").

`docker-compose config` (Debian's docker-compose package; .ci/run installs it) validates and
interpolates the file as `docker compose up` would; the result is checked for the topology, the
shared secrets, the Airflow settings (they must exist in Airflow 3.3.2 and its providers), the
pinned images, and, by running the demo profile's fakes command natively, the connections.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
AIRFLOW_SERVICES = {
    "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker",
    "airflow-triggerer",
}  # fmt: skip
SERVICES = AIRFLOW_SERVICES | {"postgres", "redis"}
# The required variables of .env.example, each with a distinct test value.
SECRETS = {
    "POSTGRES_PASSWORD": "test-postgres-password",
    "AIRFLOW_FERNET_KEY": "test-fernet-key",
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
    "D365_CA_BUNDLE": "",
}
COMPOSE_PORTS = {"entra": 8441, "commerce": 8442, "dataverse": 8443}  # the fakes' defaults
SHARED_SETTINGS = (
    "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
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


def compose_config(binary: str, tmp_path: Path, variables: dict[str, str], *options: str) -> subprocess.CompletedProcess:
    """`docker-compose [options] config` with `variables` as the .env file, nothing else from this
    process's environment (the test process sets AIRFLOW_* variables of its own)."""
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in variables.items()))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "ENV_FILE_PATH": str(env_file)}
    command = [binary, "--project-directory", str(REPO), "--file", str(COMPOSE_FILE),
               "--env-file", str(env_file), *options, "config"]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def parsed_config(binary: str, tmp_path: Path, variables: dict[str, str], *options: str) -> dict:
    result = compose_config(binary, tmp_path, variables, *options)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture
def production(compose_binary: str, tmp_path: Path) -> dict:
    return parsed_config(compose_binary, tmp_path, SECRETS | TENANT)


@pytest.fixture
def demo(compose_binary: str, tmp_path: Path) -> dict:
    return parsed_config(compose_binary, tmp_path, SECRETS, "--profile", "demo")


def environment(config: dict, service: str) -> dict[str, str]:
    return {name: str(value) for name, value in config["services"][service]["environment"].items()}


def test_production_has_the_celery_topology_and_no_fakes(production: dict) -> None:
    # `config` lists profiled services too (docker-compose 1.29); `up` without a profile skips them.
    unprofiled = {name for name, service in production["services"].items() if not service.get("profiles")}
    assert unprofiled == SERVICES
    for name in SERVICES:
        assert "fakes" not in production["services"][name].get("depends_on", {}), name


def test_the_demo_profile_adds_the_fakes(demo: dict) -> None:
    assert set(demo["services"]) == SERVICES | {"fakes"}
    assert demo["services"]["fakes"]["profiles"] == ["demo"]


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_each_secret_is_required(compose_binary: str, tmp_path: Path, missing: str) -> None:
    variables = {name: value for name, value in SECRETS.items() if name != missing}

    result = compose_config(compose_binary, tmp_path, variables)

    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


def test_every_airflow_service_shares_one_set_of_secrets(production: dict) -> None:
    settings = {service: {name: environment(production, service).get(name) for name in SHARED_SETTINGS}
                for service in AIRFLOW_SERVICES}  # fmt: skip
    first = settings["airflow-apiserver"]
    assert all(value for value in first.values()), first
    assert all(each == first for each in settings.values())
    assert first["AIRFLOW__CORE__FERNET_KEY"] == SECRETS["AIRFLOW_FERNET_KEY"]
    assert first["AIRFLOW__API_AUTH__JWT_SECRET"] == SECRETS["AIRFLOW_JWT_SECRET"]
    assert first["AIRFLOW__API__SECRET_KEY"] == SECRETS["AIRFLOW_API_SECRET_KEY"]


def test_dags_and_plugins_are_mounted_in_every_airflow_service(production: dict) -> None:
    for service in AIRFLOW_SERVICES:
        volumes = production["services"][service]["volumes"]
        mounts = {target: source for source, target, *_ in (volume.split(":") for volume in volumes)}
        assert mounts["/opt/airflow/dags"] == str(REPO / "dags"), service
        assert mounts["/opt/airflow/plugins"] == str(REPO / "plugins"), service


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


def test_the_state_store_has_its_own_database_created_by_airflow_init(production: dict) -> None:
    env = environment(production, "airflow-scheduler")
    metadata = sa.make_url(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    state = json.loads(env["AIRFLOW_CONN_D365_STATE"])

    assert state["extra"]["driver"] == "postgresql+psycopg2"
    assert (state["host"], state["port"]) == (metadata.host, metadata.port) == ("postgres", 5432)
    assert state["schema"] and state["schema"] != metadata.database
    init = " ".join(production["services"]["airflow-init"]["command"])
    assert "deploy/create_state_database.py" in init and "airflow db migrate" in init
    assert "airflow pools import /opt/airflow/plugins/b2b_onboarding/pools.json" in init
    assert (REPO / "plugins" / "b2b_onboarding" / "pools.json").is_file()


def test_the_connections_name_the_tenant_from_the_environment(production: dict) -> None:
    from b2b_onboarding.settings import ServiceSettings

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


def airflow_version_of_dockerfile() -> str:
    (base,) = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    match = re.fullmatch(r"apache/airflow:(\d+\.\d+\.\d+)-python3\.11", base)
    assert match, f"the Dockerfile's base {base} is not apache/airflow:<x.y.z>-python3.11 (constraints.txt is for 3.11)"
    return match.group(1)


def test_the_image_installs_the_pinned_requirements_on_the_same_airflow() -> None:
    import airflow

    version = airflow_version_of_dockerfile()
    dockerfile = DOCKERFILE.read_text()

    assert version == airflow.__version__  # the Airflow this suite (and make install) runs
    for pins in ("requirements.txt", "constraints.txt"):
        assert f"apache-airflow=={version}\n" in (REPO / pins).read_text(), f"{pins} pins another Airflow"
    install = re.search(r"^RUN pip install .*?(?<!\\)\n", dockerfile, flags=re.MULTILINE | re.DOTALL)
    assert install, "the Dockerfile installs no requirements"
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in install.group(0)
    assert re.search(r"-r \S*requirements\.txt -c \S*constraints\.txt", install.group(0))
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignored, "the build context would carry .venv and .env"
    for needed in ("requirements.txt", "constraints.txt"):
        assert f"!{needed}" in ignored


# --- the demo profile's fakes, run natively as the compose file gives them ------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_demo_connections_authenticate_against_the_demo_fakes(demo: dict, tmp_path: Path) -> None:
    """The `fakes` service's command (its tenant, app registration, host and certificate names) with
    the connections the Airflow services get: tokens for both APIs, and the seeded prospects."""
    from b2b_onboarding.auth import token_provider
    from b2b_onboarding.settings import ServiceSettings

    fakes = demo["services"]["fakes"]
    state_dir = tmp_path / "d365-fakes"
    ports = {"entra": free_port(), "commerce": free_port(), "dataverse": free_port()}
    # Natively there is no compose network: the service name is `localhost`, the volume a directory.
    volume_dir = next(target for source, target, *_ in (v.split(":") for v in fakes["volumes"]) if source == "d365-fakes")

    def native(text: str) -> str:
        for service, port in ports.items():
            text = text.replace(f"fakes:{COMPOSE_PORTS[service]}", f"localhost:{port}")
        return text.replace(volume_dir, str(state_dir))

    command = [native(arg) for arg in fakes["entrypoint"] + fakes["command"]]
    assert "--public-host=fakes" in fakes["command"]
    command = [arg.replace("--public-host=fakes", "--public-host=localhost") for arg in command]
    command += [f"--{service}-port={port}" for service, port in ports.items()]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO / "plugins"),
           "D365_FAKES_CLIENTS": environment(demo, "fakes")["D365_FAKES_CLIENTS"]}  # fmt: skip
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
