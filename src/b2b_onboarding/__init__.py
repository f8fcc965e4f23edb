"""Dynamics 365 Commerce B2B partner onboarding through Dynamics 365 Sales, as Airflow jobs.

The layers, each a sub-package that imports only those below it (README, Layout):

    airflow/   the Airflow glue: hooks, connection types, tasks, notifier, UI plugin, DAG params
    flow/      the flow's steps: sync, reconciliation, drift check, dry run, preflight
    store/     the state store and its migrations
    clients/   the two systems' clients: Entra ID tokens, OData, $batch, Commerce HQ, Dataverse
    domain/    what a prospect, a lead, a stage and a tenant are: pure functions over pandas frames
    errors.py, redaction.py: the failures every layer raises and the secrets none may log
"""
