-- The state store's schema as the last release without migrations created it on sqlite: the DDL its
-- StateStore emitted on an empty database (plugins/b2b_onboarding/store.py at commit 2b85b62),
-- captured once and frozen here. Never edit it: it stands for stores that exist.

CREATE TABLE b2b_prospects (
	legal_entity VARCHAR(16) NOT NULL,
	prospect_id VARCHAR(255) NOT NULL,
	stage VARCHAR(32) NOT NULL,
	prospect JSON,
	validation_error TEXT,
	lead_fields JSON,
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
	qualified_at VARCHAR(64),
	lead_outdated VARCHAR(64),
	email VARCHAR(320),
	last_error TEXT,
	last_run_id VARCHAR(250),
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (legal_entity, prospect_id)
);

CREATE INDEX ix_b2b_prospects_stage ON b2b_prospects (stage);

CREATE INDEX ix_b2b_prospects_lead ON b2b_prospects (lead_id);

CREATE INDEX ix_b2b_prospects_email ON b2b_prospects (legal_entity, email);

CREATE INDEX ix_b2b_prospects_opportunity ON b2b_prospects (opportunity_id);

CREATE TABLE b2b_transitions (
	id INTEGER NOT NULL,
	legal_entity VARCHAR(16) NOT NULL,
	prospect_id VARCHAR(255) NOT NULL,
	from_stage VARCHAR(32),
	to_stage VARCHAR(32) NOT NULL,
	run_id VARCHAR(250),
	error TEXT,
	at DATETIME NOT NULL,
	detail TEXT,
	dag_id VARCHAR(250),
	task_id VARCHAR(250),
	map_index INTEGER,
	PRIMARY KEY (id)
);

CREATE INDEX ix_b2b_transitions_prospect ON b2b_transitions (legal_entity, prospect_id);

CREATE TABLE b2b_opportunities (
	opportunity_id VARCHAR(64) NOT NULL,
	legal_entity VARCHAR(16) NOT NULL,
	prospect_id VARCHAR(255) NOT NULL,
	state VARCHAR(16) NOT NULL,
	run_id VARCHAR(250),
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (opportunity_id)
);

CREATE INDEX ix_b2b_opportunities_prospect ON b2b_opportunities (legal_entity, prospect_id);

CREATE TABLE b2b_delta_links (
	entity_set VARCHAR(64) NOT NULL,
	delta_link TEXT NOT NULL,
	run_id VARCHAR(250),
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (entity_set)
);

CREATE TABLE b2b_drift_findings (
	id INTEGER NOT NULL,
	run_id VARCHAR(250) NOT NULL,
	checked_at DATETIME NOT NULL,
	kind VARCHAR(32) NOT NULL,
	legal_entity VARCHAR(16),
	prospect_id VARCHAR(255),
	lead_id VARCHAR(64),
	detail TEXT NOT NULL,
	PRIMARY KEY (id)
);

CREATE INDEX ix_b2b_drift_findings_run_id ON b2b_drift_findings (run_id);

CREATE TABLE b2b_anomalies (
	legal_entity VARCHAR(16) NOT NULL,
	prospect_id VARCHAR(255) NOT NULL,
	kind VARCHAR(48) NOT NULL,
	detail TEXT NOT NULL,
	first_run_id VARCHAR(250),
	last_run_id VARCHAR(250),
	first_seen DATETIME NOT NULL,
	last_seen DATETIME NOT NULL,
	times_seen INTEGER NOT NULL,
	PRIMARY KEY (legal_entity, prospect_id, kind)
);

CREATE TABLE b2b_task_failures (
	id INTEGER NOT NULL,
	dag_id VARCHAR(250) NOT NULL,
	run_id VARCHAR(250) NOT NULL,
	task_id VARCHAR(250) NOT NULL,
	map_index INTEGER NOT NULL,
	rendered_map_index VARCHAR(250),
	try_number INTEGER NOT NULL,
	failed_at DATETIME NOT NULL,
	error TEXT NOT NULL,
	legal_entity VARCHAR(16),
	first_id VARCHAR(255),
	last_id VARCHAR(255),
	PRIMARY KEY (id)
);

CREATE INDEX ix_b2b_task_failures_run ON b2b_task_failures (dag_id, run_id);

CREATE TABLE b2b_step_results (
	dag_id VARCHAR(250) NOT NULL,
	run_id VARCHAR(250) NOT NULL,
	task_id VARCHAR(250) NOT NULL,
	map_index INTEGER NOT NULL,
	step VARCHAR(64) NOT NULL,
	legal_entity VARCHAR(16) NOT NULL,
	dry_run BOOLEAN NOT NULL,
	result TEXT NOT NULL,
	recorded_at DATETIME NOT NULL,
	PRIMARY KEY (dag_id, run_id, task_id, map_index)
);

CREATE TABLE b2b_dry_run_rows (
	run_id VARCHAR(250) NOT NULL,
	legal_entity VARCHAR(16) NOT NULL,
	prospect_id VARCHAR(255) NOT NULL,
	"row" TEXT NOT NULL,
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (run_id, legal_entity, prospect_id)
);

CREATE TABLE b2b_planned_writes (
	id INTEGER NOT NULL,
	run_id VARCHAR(250) NOT NULL,
	task VARCHAR(250) NOT NULL,
	system VARCHAR(64) NOT NULL,
	operation VARCHAR(64) NOT NULL,
	legal_entity VARCHAR(16),
	prospect_id VARCHAR(255),
	what TEXT NOT NULL,
	planned_at DATETIME NOT NULL,
	PRIMARY KEY (id)
);

CREATE INDEX ix_b2b_planned_writes_run_id ON b2b_planned_writes (run_id);

CREATE TABLE b2b_tenant_models (
	run_id VARCHAR(250) NOT NULL,
	connection VARCHAR(250) NOT NULL,
	model TEXT NOT NULL,
	read_at DATETIME NOT NULL,
	PRIMARY KEY (run_id, connection)
);
