"""Write the Airflow UI's admin password for Airflow's simple auth manager (airflow-init).

The file is the one `[core] simple_auth_manager_passwords_file` names, as the auth manager reads it:
`{"<username>": "<password>"}`, from AIRFLOW_ADMIN_USERNAME and AIRFLOW_ADMIN_PASSWORD (.env).
Mode 0600; the password is never printed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def main() -> None:
    path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    passwords = {os.environ.get("AIRFLOW_ADMIN_USERNAME", "admin"): os.environ["AIRFLOW_ADMIN_PASSWORD"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        os.fchmod(file.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        json.dump(passwords, file)
    print(f"admin password written for {', '.join(passwords)} to {path}")


if __name__ == "__main__":
    main()
