"""What drives the product against the fakes: the demo, the local Airflow, the benchmark and the chaos run.
Not part of the product, not in its image."""
