"""Layer 2: the clients of the two systems (Entra ID tokens, OData over HTTPS, $batch, Commerce HQ,
Dataverse). They speak in the domain's terms and know nothing of the store or of Airflow."""
