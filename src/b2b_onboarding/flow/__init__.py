"""Layer 4: the flow's steps: sync, reconciliation, drift check, dry run, preflight. Each reads and
writes through the clients and the store and applies the domain's rules. No Airflow."""
