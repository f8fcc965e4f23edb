import pytest

from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.errors import ConfigurationError


def test_a_complete_connection(tmp_path):
    from d365_fakes.tls import ensure_tls

    ca_bundle = str(ensure_tls(tmp_path).ca_bundle)  # the bundle must exist and hold a certificate
    settings = ServiceSettings.from_connection(
        "d365_commerce", "https://contoso.operations.dynamics.com/", "client", "s3cret",
        {"tenant_id": "t-1", "legal_entities": "usrt, usmf", "ca_bundle": ca_bundle},
    )  # fmt: skip
    assert settings.scope == "https://contoso.operations.dynamics.com/.default"
    assert settings.authority == "https://login.microsoftonline.com/t-1"
    assert settings.legal_entities == ("usrt", "usmf")
    assert settings.verify == ca_bundle


def test_a_host_without_scheme_means_https_and_tls_is_verified_by_default():
    settings = ServiceSettings.from_connection("c", "org.crm.dynamics.com", "id", "s", {"tenant_id": "t"}, port=8443)
    assert settings.resource == "https://org.crm.dynamics.com:8443"
    assert settings.verify is True


def test_problems_are_named_by_connection_field_and_the_secret_never_shows():
    with pytest.raises(ConfigurationError) as caught:
        ServiceSettings.from_connection("d365_sales", "http://plain", "", "hunter2", {"colour": "red"})
    message = str(caught.value)
    assert "'d365_sales'" in message
    assert "host" in message and "login" in message and "extra.authority or extra.tenant_id" in message
    assert "extra.colour" in message
    assert "hunter2" not in message


def test_the_secret_is_masked_in_repr():
    settings = ServiceSettings.from_connection("c", "https://x", "id", "hunter2", {"authority": "https://a/t"})
    assert "hunter2" not in repr(settings)
