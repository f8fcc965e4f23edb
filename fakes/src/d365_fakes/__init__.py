"""Local fakes of Microsoft Entra ID, Commerce headquarters OData and the Dataverse Web API.

Served over HTTPS with a locally generated CA, so product code can use real MSAL and httpx against
them. Start them with `python -m d365_fakes serve`, or `d365_fakes.running.running_fakes(...)`.
"""
