# The images of docker-compose.yaml (README, "Production"), one stage per job:
#   provider-wheel  builds the provider package's wheel from pyproject.toml and src/
#   fakes-wheel     builds the fakes' wheel from fakes/ (the demo only)
#   demo            the fakes, for the demo profile's `fakes` service
#   production      Airflow with the provider package: every Airflow service runs it. Last, so that a plain
#                   `docker build .` makes it; it takes nothing from the fakes' stages.
# constraints.txt is resolved for Python 3.11, hence the python3.11 variant of Airflow's image.
FROM apache/airflow:3.3.2-python3.11 AS airflow

FROM airflow AS provider-wheel
# pip builds in the source tree (egg-info, build/): the airflow user must own it.
COPY --chown=airflow:0 pyproject.toml README.md /opt/airflow/provider/
COPY --chown=airflow:0 src /opt/airflow/provider/src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /opt/airflow/wheels /opt/airflow/provider

FROM airflow AS fakes-wheel
COPY --chown=airflow:0 fakes /opt/airflow/fakes
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /opt/airflow/wheels /opt/airflow/fakes

FROM airflow AS demo
COPY constraints.txt /opt/airflow/deploy/
COPY --from=fakes-wheel /opt/airflow/wheels /opt/airflow/wheels
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/airflow/wheels/*.whl \
        -c /opt/airflow/deploy/constraints.txt
# The fakes' state directory (their CA among it), the mount point of the d365-fakes volume: a new volume
# takes its ownership, so the airflow user can write to it.
RUN mkdir -p /opt/airflow/d365-fakes

FROM airflow AS production
# As Airflow's docs advise for extending its image: naming the image's own Airflow version
# (AIRFLOW_VERSION is set by the base image) makes pip fail rather than change Airflow. The wheel,
# not the sources: installed as any deployment installs the provider, found by its entry points.
# No requirements-dev.txt (test tools) and no fakes.
COPY requirements.txt constraints.txt /opt/airflow/deploy/
COPY --from=provider-wheel /opt/airflow/wheels /opt/airflow/wheels
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/airflow/wheels/*.whl \
        -r /opt/airflow/deploy/requirements.txt -c /opt/airflow/deploy/constraints.txt

COPY deploy/create_state_database.py deploy/write_admin_password.py /opt/airflow/deploy/
# Mount points of named volumes: a new volume takes the ownership of its image directory, so the
# airflow user can write to it. auth holds the UI's password file; ca the CA certificates that the
# connections' ca_bundle may name (docker-compose.yaml: none in production, the fakes' in the demo).
RUN mkdir -p /opt/airflow/auth /opt/airflow/ca && chmod 0700 /opt/airflow/auth
