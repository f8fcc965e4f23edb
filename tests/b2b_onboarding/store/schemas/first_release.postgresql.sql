-- The state store's schema as the first release (fewer tables, columns and indexes) created it on postgresql: the DDL its
-- StateStore emitted on an empty database (plugins/b2b_onboarding/store.py at commit 7f98172),
-- captured once and frozen here. Never edit it: it stands for stores that exist.

CREATE TABLE b2b_prospects (
	legal_entity VARCHAR(16) NOT NULL,
	prospect_id VARCHAR(255) NOT NULL,
	stage VARCHAR(32) NOT NULL,
	prospect JSON,
	validation_error TEXT,
	lead_id VARCHAR(64),
	lead_state VARCHAR(64),
	opportunity_id VARCHAR(64),
	opportunity_state VARCHAR(64),
	account_id VARCHAR(64),
	contact_id VARCHAR(64),
	org_customer_account VARCHAR(64),
	person_customer_account VARCHAR(64),
	org_party_number VARCHAR(64),
	person_party_number VARCHAR(64),
	hierarchy_id VARCHAR(64),
	decision VARCHAR(64),
	last_error TEXT,
	last_run_id VARCHAR(250),
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (legal_entity, prospect_id)
);

CREATE INDEX ix_b2b_prospects_stage ON b2b_prospects (stage);

CREATE TABLE b2b_transitions (
	id SERIAL NOT NULL,
	legal_entity VARCHAR(16) NOT NULL,
	prospect_id VARCHAR(255) NOT NULL,
	from_stage VARCHAR(32),
	to_stage VARCHAR(32) NOT NULL,
	run_id VARCHAR(250),
	error TEXT,
	at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id)
);

CREATE INDEX ix_b2b_transitions_prospect ON b2b_transitions (legal_entity, prospect_id);
