"""Layer 5: the Airflow glue: hooks that turn connections into clients and stores, the connection
types, the tasks the DAGs run, the notifier, the UI plugin and the DAGs' shared params."""
