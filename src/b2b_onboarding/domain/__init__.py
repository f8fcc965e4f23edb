"""Layer 1: what a prospect, its lead, its customers, its stage and the tenant's tables are, and the
rules over them. Pure functions over pandas frames: no I/O, no Airflow."""
