"""Seller stories: the flow as real sellers, clerks and tenants moving off dual-write work it, run by
Airflow (`dag.test()`) against the fakes through the Dataverse Web API and HQ OData.

What the business owner expects, story by story (README, "Sellers, clerks and the cut-over"):
- a second requester of a company that is already a B2B customer: the company's customers reused,
  the requester a User of its hierarchy, one approval email; the same when the requester already is
  a Person customer;
- a lead qualified without an opportunity, the opportunity made later and won: approved; while it
  waits too long, an anomaly `qualified_without_opportunity`, gone once the opportunity exists;
- a prospect corrected in HQ: its open lead follows, the Person customer and the approval email get
  the corrected email; a column the seller changed too keeps the seller's value and is reported;
- the cut-over: a lead dual-write wrote is adopted (never a second lead), also one already
  disqualified (rejected at once), one a seller keyed in another case and never tagged (adopted and
  tagged); two leads for one prospect are an anomaly and neither is adopted; prospects decided before
  the cut-over or by hand before any lead are recorded as decided, never a missing lead, never mailed;
- an account whose number names a customer of another legal entity: an anomaly, nothing written.
Then, for every prospect: one lead (none made by us where the story forbids it), at most one
Organization and one Person customer per company name and email, one email per decided prospect,
the decision the seller made and never flipped, every refused record kept with its message, and an
idle rerun writes nothing.
"""

from __future__ import annotations

from collections import Counter

import pytest

from b2b_onboarding.store.state import StateStore
from d365_fakes import stories
from d365_fakes.actors import Clerk, Seller
from d365_fakes.dataverse import company_id
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import CUSTOMER_GROUP, total_writes

pytestmark = pytest.mark.e2e

LE = stories.LEGAL_ENTITY


def prospect(number: int, company: str, email: str, **fields) -> dict:
    return {**stories.request(number, f"Person {number}", company, email), **fields}


def run(dags, dag_id: str, sla_breached: bool = False, **conf) -> str:
    """Runs a DAG; every task succeeds (or is skipped), but for `check_sla` when anomalies are open:
    the run is then failed through its last task, as it must be (the run state tells the truth)."""
    dag_run = dags.get_dag(dag_id).test(run_conf=conf or None)
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    failed = sorted(task for task, state in states.items() if state not in ("success", "skipped"))
    assert failed == (["all_tasks_succeeded", "check_sla"] if sla_breached else []), (dag_id, states)
    assert dag_run.state == ("failed" if sla_breached else "success"), (dag_id, dag_run.state)
    return dag_run.run_id


def leads_of(seller: Seller, prospect_id: str) -> list[dict]:
    """Every lead naming the prospect, in either form of key and any case."""
    rows = seller.rows("leads", {"$select": "leadid,msdyn_prospectid,_msdyn_company_value,statecode,"
                                            "msdyn_b2bcommerceprospect,telephone1,emailaddress1"})  # fmt: skip
    return [row for row in rows if (row["msdyn_prospectid"] or "").casefold() in
            (prospect_id.casefold(), f"{LE}:{prospect_id}".casefold())]  # fmt: skip


def test_seller_stories(world, dags):
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    clerk = Clerk(world.endpoints, world.cast.clerk["client_id"], world.cast.clerk["client_secret"])
    store = StateStore(f"sqlite:///{world.state_db}")
    with FakeAdmin(world.endpoints) as admin:
        told = stories.seed(admin, seller, clerk)
        plan = dict(told.plan)
        # More of what real tenants bring (S-000011 on).
        pat = clerk.create_customer({"dataAreaId": LE, "PartyType": "Person", "PersonFirstName": "Pat",
                                     "PersonLastName": "Known", "PrimaryContactEmail": "pat@contoso.example",
                                     "CustomerGroupId": CUSTOMER_GROUP})  # fmt: skip
        usmf_org = clerk.create_customer({"dataAreaId": "usmf", "PartyType": "Organization", "OrganizationName": "Litware",
                                          "CustomerGroupId": CUSTOMER_GROUP})  # fmt: skip
        extra = [
            prospect(11, "Clash Corp", "clash@clash.example"),  # corrected in HQ where the seller edited too
            prospect(12, "Case Corp", "case@case.example"),  # a seller keyed its lead by hand, in capitals, untagged
            prospect(13, "Twin Corp", "twin@twin.example"),  # two leads before the cut-over
            prospect(14, "Done Corp", "done@done.example", B2BProspectStatus="Approved"),  # decided before the cut-over
            prospect(15, "Hand Corp", "hand@hand.example", B2BProspectStatus="Rejected"),  # rejected by hand, no lead
            prospect(16, "Gone Corp", "gone@gone.example"),  # dual-write lead disqualified before the cut-over
            prospect(17, "Litware", "lit@litware.example"),  # account numbered with a usmf customer
            prospect(18, stories.ONBOARDED, "pat@contoso.example"),  # a requester already a Person customer
        ]
        admin.seed_prospects(extra)
        plan.update({"clash@clash.example": "untouched", "case@case.example": "disqualified",
                     "twin@twin.example": "untouched", "done@done.example": "won", "hand@hand.example": "disqualified",
                     "gone@gone.example": "disqualified", "lit@litware.example": "untouched",
                     "pat@contoso.example": "won"})  # fmt: skip
        company = company_id(LE)
        seller.call("POST", "leads", json={"msdyn_prospectid": "USRT:S-000012", "lastname": "Case",
                                           "companyname": "Case Corp", "emailaddress1": "case@case.example"})  # fmt: skip
        seller.create_dual_write_lead(extra[2], company)
        seller.call("POST", "leads", json={"msdyn_prospectid": "usrt:S-000013", "lastname": "Twin",
                                           "msdyn_b2bcommerceprospect": True})  # fmt: skip
        done_lead = seller.create_dual_write_lead(extra[3], company)
        seller.close_opportunity(seller.qualify(done_lead), won=True)
        seller.disqualify(seller.create_dual_write_lead(extra[5], company))
        litware = seller.create_account("Litware", accountnumber=usmf_org["CustomerAccount"])
        writes_before_first_run = total_writes(admin.counts())

        # First sync: new leads, and the cut-over's leads adopted as they are.
        run(dags, "b2b_prospect_sync")
        for prospect_id in ("S-000004", "S-000012", "S-000016"):
            assert len(leads_of(seller, prospect_id)) == 1, prospect_id
        [case_lead] = leads_of(seller, "S-000012")
        assert case_lead["msdyn_b2bcommerceprospect"] is True  # adopted and tagged, not refused forever
        assert len(leads_of(seller, "S-000013")) == 2 and leads_of(seller, "S-000015") == []
        tracked = store.frame().set_index("prospect_id")
        assert tracked.loc["S-000013", "lead_id"] is None and "2 leads" in tracked.loc["S-000013", "last_error"]

        # Sellers and clerks.
        stories.after_first_sync(seller, clerk, told)
        clash = stories.lead_of(seller, "clash@clash.example")
        seller.edit_lead(clash["leadid"], telephone1="+1 555 7777")
        clerk.correct(LE, "S-000011", PrimaryPhoneNumber="+1 555 0000")
        seller.disqualify(case_lead["leadid"])
        lit = stories.lead_of(seller, "lit@litware.example")
        seller.link(lit["leadid"], account_id=litware)
        seller.close_opportunity(seller.qualify(lit["leadid"], create_account=False), won=True)
        pat_lead = stories.lead_of(seller, "pat@contoso.example")
        pat_contact = seller.create_contact("Pat", "Known", "pat@contoso.example", account_id=told.account_id)
        seller.link(pat_lead["leadid"], account_id=told.account_id, contact_id=pat_contact)
        seller.close_opportunity(seller.qualify(pat_lead["leadid"], create_account=False, create_contact=False), won=True)

        # The reconciliation: a qualified lead with no opportunity is flagged at once (limit 0 days).
        run(dags, "b2b_outcome_reconciliation", sla_breached=True, qualified_without_opportunity_days=0)
        anomalies = Counter(store.anomalies()["kind"])
        assert anomalies["qualified_without_opportunity"] == 1 and anomalies["account_of_other_legal_entity"] == 1
        assert anomalies["duplicate_leads"] == 1

        # The corrections reach Sales; then the late opportunity and the others are won.
        run(dags, "b2b_prospect_sync")
        assert stories.lead_of(seller, "clash@clash.example")["telephone1"] == "+1 555 7777"  # the seller's value stays
        assert stories.lead_of(seller, told.corrected_email)["telephone1"] == "+1 555 0199"
        stories.after_corrections_synced(seller, told)
        run(dags, "b2b_outcome_reconciliation", sla_breached=True)

        anomalies = store.anomalies().set_index("prospect_id")
        assert dict(zip(anomalies.index, anomalies["kind"])) == {
            "S-000011": "lead_edited_in_sales", "S-000013": "duplicate_leads", "S-000017": "account_of_other_legal_entity",
        }  # the late opportunity's anomaly is gone: it has one now
        assert "S-000011" in anomalies.loc["S-000011", "detail"] and "telephone1" in anomalies.loc["S-000011", "detail"]
        counts, violations = stories.judge(seller, clerk, admin.outbox(), told)
        assert violations == [] and set(counts.values()) == {1}

        # An idle rerun writes nothing, and nothing is flipped.
        before, statuses = total_writes(admin.counts()), {row["ProspectId"]: row["B2BProspectStatus"]
                                                          for row in clerk.all("Prospects")}  # fmt: skip
        run(dags, "b2b_prospect_sync")
        last_reconciliation = run(dags, "b2b_outcome_reconciliation", sla_breached=True)
        assert total_writes(admin.counts()) == before
        prospects_now = {row["ProspectId"]: row for row in clerk.all("Prospects") if row["ProspectId"].startswith("S-")}
        assert {pid: row["B2BProspectStatus"] for pid, row in prospects_now.items()} == {
            pid: status for pid, status in statuses.items() if pid.startswith("S-")}

        # Every prospect as its seller decided, one email each decided one, none for the others.
        expected = {"won": "Approved", "disqualified": "Rejected", "untouched": "Pending"}
        outbox = Counter((mail["dataAreaId"], mail["ProspectId"]) for mail in admin.outbox())
        for prospect_id, row in prospects_now.items():
            wanted = expected[plan[row["PrimaryEmailAddress"]]]
            assert row["B2BProspectStatus"] == wanted, (prospect_id, row["B2BProspectStatus"], wanted)
            decided_by_us = wanted != "Pending" and prospect_id not in ("S-000014", "S-000015")
            assert outbox[(LE, prospect_id)] == int(decided_by_us), prospect_id

        # One lead per prospect; none made where a lead existed or none may be.
        for prospect_id in prospects_now:
            count = len(leads_of(seller, prospect_id))
            assert count == {"S-000013": 2, "S-000015": 0}.get(prospect_id, 1), (prospect_id, count)
        # At most one Organization per company name and one Person per email, counting those before.
        customers = clerk.customers(LE)
        organizations = Counter(row["OrganizationName"] for row in customers if row["PartyType"] == "Organization")
        persons = Counter(row["PrimaryContactEmail"].casefold() for row in customers if row["PartyType"] == "Person")
        assert max(organizations.values()) == 1 and max(persons.values()) == 1, (organizations, persons)
        assert persons["pat@contoso.example"] == 1 and "Litware" not in organizations
        nodes = {(row["NodePartyNumber"], row["Role"]) for row in clerk.all("CustomerHierarchyNodes")
                 if row["CustomerHierarchyId"] == stories.HIERARCHY}  # fmt: skip
        assert (pat["PartyNumber"], "User") in nodes
        hierarchies = clerk.all("CustomerHiearchies")
        assert {row["dataAreaId"] for row in hierarchies} == {LE}  # written in the prospect's legal entity

        # Refused records kept with their message; the cut-over's decided prospects recorded as decided.
        tracked = store.frame().set_index("prospect_id")
        for prospect_id in ("S-000013", "S-000017"):
            assert f"prospect {LE}/{prospect_id}" in tracked.loc[prospect_id, "last_error"]
        assert tracked.loc["S-000014", "stage"] == "approved" and tracked.loc["S-000015", "stage"] == "rejected"
        drift = store.drift(last_reconciliation)
        assert not set(drift["prospect_id"].dropna()) & {"S-000014", "S-000015", "S-000012"}, drift
        assert total_writes(admin.counts()) > writes_before_first_run
    seller.close()
    clerk.close()
