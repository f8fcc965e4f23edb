# The image every service of docker-compose.yaml runs: Airflow's own image, plus the product's
# pinned requirements. constraints.txt is resolved for Python 3.11, hence the python3.11 variant.
FROM apache/airflow:3.3.2-python3.11

# As Airflow's docs advise for extending its image: naming the image's own Airflow version
# (AIRFLOW_VERSION is set by the base image) makes pip fail rather than change Airflow.
COPY requirements.txt constraints.txt /opt/airflow/deploy/
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" \
        -r /opt/airflow/deploy/requirements.txt -c /opt/airflow/deploy/constraints.txt

COPY deploy/create_state_database.py deploy/write_admin_password.py /opt/airflow/deploy/
# Mount points of named volumes: a new volume takes the ownership of its image directory, so the
# airflow user can write to it. auth holds the UI's password file; d365-fakes the demo fakes' CA.
RUN mkdir -p /opt/airflow/auth /opt/airflow/d365-fakes && chmod 0700 /opt/airflow/auth
