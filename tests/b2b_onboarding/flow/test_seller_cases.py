"""The steps against the fakes (no Airflow) in the cases real tenants bring that the seller stories
(tests/e2e/test_seller_stories.py) do not play: an outage longer than a change-tracking token's
life, the one-by-one mode at the cut-over, customers left half made, and templated customer accounts."""

from __future__ import annotations

import dataclasses
import time

import pytest

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.errors import ConfigurationError
from b2b_onboarding.flow import reconcile, sync
from d365_fakes.actors import Seller
from d365_fakes.dataverse import company_id
from d365_fakes.running import FakeAdmin, running_fakes
from d365_fakes.scenario import CUSTOMER_GROUP, Cast

RUN = "manual__test"


def request(number: int, **fields) -> dict:
    return {"dataAreaId": "usrt", "ProspectId": f"P-{number:06d}", "ProspectName": f"Ada Lovelace{number}",
            "CompanyName": f"Engines {number}", "PrimaryEmailAddress": f"p{number}@engines.example", **fields}  # fmt: skip


def clients(world, **extra) -> tuple[CommerceClient, SalesClient]:
    return (CommerceClient.connect(world.settings(world.endpoints.commerce, **extra)),
            SalesClient.connect(world.settings(world.endpoints.dataverse, **extra)))  # fmt: skip


def test_after_a_token_expired_the_full_read_reports_what_was_deleted_meanwhile(world, store, tmp_path):
    cast = Cast.new()
    with running_fakes(tmp_path / "fakes", cast.clients, delta_token_ttl_s=1) as endpoints, FakeAdmin(endpoints) as admin:
        world = dataclasses.replace(world, endpoints=endpoints, cast=cast)
        admin.seed_prospects([request(n) for n in range(1, 5)])
        commerce, sales = clients(world)
        seller = Seller(endpoints, cast.seller["client_id"], cast.seller["client_secret"])
        with commerce.odata, sales.odata:
            sync.pull_prospects(commerce, store, "usrt", RUN)
            sync.push_leads(sales, store, "usrt", RUN)
            leads = store.frame().set_index("prospect_id")["lead_id"]
            opportunity = seller.qualify(leads["P-000002"])
            reconcile.read_outcomes(sales, store, RUN)
            # The outage: a lead and an opportunity deleted, then the token expires.
            seller.delete_lead(leads["P-000001"])
            seller.call("DELETE", f"opportunities({opportunity})")
            time.sleep(2.5)  # the fake's tokens carry whole seconds
            again = reconcile.read_outcomes(sales, store, RUN)
        seller.close()
    assert again["leads_full_reads"] == 1 and again["leads_deleted"] == 1 and again["opportunities_deleted"] == 1
    kinds = {(row["prospect_id"], row["kind"]) for row in store.anomalies().to_dict("records")}
    assert kinds == {("P-000001", "lead_deleted"), ("P-000002", "opportunity_deleted")}


def test_one_by_one_the_cut_over_adopts_dual_write_leads_and_refuses_two(world, admin, store, seller):
    admin.seed_prospects([request(1), request(2), request(3)])
    dual_write = seller.create_dual_write_lead(request(1), company_id("usrt"))
    seller.create_dual_write_lead(request(2), company_id("usrt"), tagged=False)
    seller.call("POST", "leads", json={"msdyn_prospectid": "USRT:P-000002", "lastname": "Twin"})
    commerce, sales = clients(world, bulk=False, change_tracking=False)
    with commerce.odata, sales.odata:
        sync.pull_prospects(commerce, store, "usrt", RUN)
        pushed = sync.push_leads(sales, store, "usrt", RUN)
        again = sync.push_leads(sales, store, "usrt", RUN)
    assert (pushed["adopted"], pushed["created"], pushed["conflicts"]) == (1, 1, 1)
    assert (again.get("created", 0), again.get("adopted", 0), again["conflicts"]) == (0, 0, 1)
    tracked = store.frame().set_index("prospect_id")
    assert tracked.loc["P-000001", "lead_id"] == dual_write and tracked.loc["P-000002", "lead_id"] is None
    assert list(store.anomalies()["kind"]) == ["duplicate_leads"]
    assert admin.counts()["dataverse"]["writes"]["leads"] == 4  # the three made here, and P-000003's


def won(admin: FakeAdmin, store, commerce: CommerceClient, sales: SalesClient, *numbers: int) -> None:
    sync.pull_prospects(commerce, store, "usrt", RUN)
    sync.push_leads(sales, store, "usrt", RUN)
    admin.decide([{"msdyn_prospectid": f"usrt:P-{n:06d}", "outcome": "won"} for n in numbers])
    reconcile.read_outcomes(sales, store, RUN)


def test_an_organization_left_without_its_person_is_finished_not_doubled(world, admin, store, clerk):
    admin.seed_prospects([request(1)])
    commerce, sales = clients(world)
    with commerce.odata, sales.odata:
        won(admin, store, commerce, sales, 1)
        # An earlier run's one-by-one path made the organization, then failed before the person.
        account = sales.get_by_ids("accounts", "accountid", [store.frame().loc[0, "account_id"]], ("name",))[0]
        made = clerk.create_customer({"dataAreaId": "usrt", "PartyType": "Organization", "OrganizationName": account["name"],
                                      "PrimaryContactEmail": "p1@engines.example", "CustomerGroupId": CUSTOMER_GROUP})  # fmt: skip
        result = reconcile.write_customers(commerce, sales, store, "usrt", RUN, CUSTOMER_GROUP)
        reconcile.approve_won(commerce, store, "usrt", RUN)
        row = store.frame().loc[0]
        [numbered] = sales.get_by_ids("accounts", "accountid", [row["account_id"]], ("accountnumber",))
    assert result["existing customers reused"] == 1
    customers = clerk.customers("usrt")
    assert sorted(row["PartyType"] for row in customers) == ["Organization", "Person"]
    assert (row["org_customer_account"], row["stage"]) == (made["CustomerAccount"], "approved")
    assert numbered["accountnumber"] == made["CustomerAccount"]


def test_a_customer_account_template_numbers_customers_with_the_legal_entity_and_a_rerun_finds_them(world, admin, store,
                                                                                                    clerk):  # fmt: skip
    template = "{legal_entity}-{prospect_id}-{role}"
    admin.seed_prospects([request(1), request(1, dataAreaId="usmf", PrimaryEmailAddress="other@engines.example")])
    commerce, sales = clients(world)
    keys = [(le, "P-000001") for le in ("usrt", "usmf")]
    with commerce.odata, sales.odata:
        for legal_entity, _ in keys:
            sync.pull_prospects(commerce, store, legal_entity, RUN)
            sync.push_leads(sales, store, legal_entity, RUN)
        admin.decide([{"msdyn_prospectid": f"{le}:{pid}", "outcome": "qualified"} for le, pid in keys])
        reconcile.read_outcomes(sales, store, RUN)
        for legal_entity, _ in keys:
            reconcile.write_customers(commerce, sales, store, legal_entity, RUN, CUSTOMER_GROUP, account_template=template)
        writes = admin.counts()["commerce"]["writes"]["CustomersV3"]
        # As if the store had lost them: the rerun finds the customers by their templated accounts.
        forgotten = dict.fromkeys(("org_customer_account", "person_customer_account", "org_party_number",
                                   "person_party_number"))  # fmt: skip
        store.update_many([(key, forgotten, None) for key in keys], RUN)
        again = [reconcile.write_customers(commerce, sales, store, le, RUN, CUSTOMER_GROUP, account_template=template)
                 for le, _ in keys]
        numbers = sorted(row["accountnumber"] for row in sales.get_by_ids("accounts", "accountid",
                                                                           store.frame()["account_id"], ("accountnumber",)))  # fmt: skip
    accounts = sorted(row["CustomerAccount"] for le, _ in keys for row in clerk.customers(le))
    assert accounts == ["USMF-P-000001-ADM", "USMF-P-000001-ORG", "USRT-P-000001-ADM", "USRT-P-000001-ORG"]
    assert writes == admin.counts()["commerce"]["writes"]["CustomersV3"] == 4
    assert [result["existing customers reused"] for result in again] == [2, 2]
    assert numbers == ["USMF-P-000001-ORG", "USRT-P-000001-ORG"]  # one Sales column, no collision across companies


def test_a_dry_run_of_the_cut_over_lists_what_would_be_adopted_created_and_ambiguous(world, admin, store, seller):
    from b2b_onboarding.flow.dry_run import DryRunSales, Plan
    from b2b_onboarding.store.state import DryRunStore

    admin.seed_prospects([request(1), request(2), request(3)])
    seller.create_dual_write_lead(request(1), company_id("usrt"))
    seller.create_dual_write_lead(request(2), company_id("usrt"))
    seller.call("POST", "leads", json={"msdyn_prospectid": "usrt:P-000002", "lastname": "Twin"})
    commerce, sales = clients(world)
    plan = Plan()
    dry = DryRunStore(str(store.engine.url), "manual__dry")
    with commerce.odata, sales.odata:
        sync.pull_prospects(commerce, dry, "usrt", "manual__dry")
        before = admin.counts()["dataverse"]["writes"]["leads"]
        pushed = sync.push_leads(DryRunSales(sales, plan, "usrt"), dry, "usrt", "manual__dry")
    assert (pushed["adopted"], pushed["created"], pushed["conflicts"]) == (1, 1, 1)
    assert [(row["operation"], row["prospect_id"]) for row in plan.frame().to_dict("records")] == [("create lead", "P-000003")]
    assert admin.counts()["dataverse"]["writes"]["leads"] == before
    assert store.frame().empty and store.anomalies().empty  # the store's facts stay as they are


def test_a_legal_entity_without_its_cdm_companies_row_fails_at_once_naming_it_and_what_to_do(world, admin, store):
    admin.seed_prospects([request(1)])  # creates usrt's row, as dual-write's legal-entity map would
    commerce, sales = clients(world)
    with commerce.odata, sales.odata:
        sync.pull_prospects(commerce, store, "usrt", RUN)
        assert sales.company_id("USRT") == company_id("usrt")
        with pytest.raises(ConfigurationError) as raised:
            sales.company_id("dezz")
    message = str(raised.value)
    assert message.startswith("Dataverse (Sales): legal entity 'dezz' has no row in cdm_companies")
    assert "Next step: add the legal entity to Dataverse" in message


def test_customers_are_created_in_the_connections_customer_group_and_never_without_one(world, admin, store, clerk):
    admin.seed_prospects([request(1)])
    commerce, sales = clients(world)
    with commerce.odata, sales.odata:
        won(admin, store, commerce, sales, 1)
        before = admin.counts()["commerce"]["requests"]
        with pytest.raises(ConfigurationError, match=r"^Commerce headquarters via Airflow connection 'd365_test': no "
                                                     "customer group configured: HQ requires one for every new customer"):  # fmt: skip
            reconcile.write_customers(commerce, sales, store, "usrt", RUN, None)
        assert admin.counts()["commerce"]["requests"] == before  # refused before any call
        # A group HQ does not know in the legal entity: HQ refuses the customer, the record waits for the next run.
        unknown = reconcile.write_customers(commerce, sales, store, "usrt", RUN, "NO-SUCH")
        assert unknown["failed one by one"] == 1 and clerk.customers("usrt") == []
        assert "The value 'NO-SUCH' in field 'Customer group' is not found" in store.frame().loc[0, "last_error"]
        reconcile.write_customers(commerce, sales, store, "usrt", RUN, "20")
    assert sorted((row["PartyType"], row["CustomerGroupId"]) for row in clerk.customers("usrt")) == [
        ("Organization", "20"), ("Person", "20")]
