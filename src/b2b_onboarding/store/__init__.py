"""Layer 3: the state store (what is known of every prospect, the run's results, the lock) and its
Alembic migrations. No Airflow."""
