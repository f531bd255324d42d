-- The audit trail (ADR 0006, ADR 0011): one hash chain per entity, signed
-- checkpoints, and per-subject keys for crypto-shredding.

-- The head of each entity's chain. Appends lock the row (FOR UPDATE), so the
-- appends to one chain are serialised while chains are independent. The row
-- is a convenience, never trusted by verification.
CREATE TABLE audit_chains (
    entity_id uuid PRIMARY KEY,
    head_sequence bigint NOT NULL DEFAULT 0,
    head_hash text NOT NULL DEFAULT repeat('0', 64),
    checkpoint_sequence bigint NOT NULL DEFAULT 0,
    update_time timestamptz NOT NULL DEFAULT now()
);

-- The events. Every column enters the event's hash (ADR 0011), except
-- `content_digest`, which only detects a redelivery with other content.
CREATE TABLE audit_events (
    entity_id uuid NOT NULL,
    sequence bigint NOT NULL CHECK (sequence > 0),
    id uuid NOT NULL,
    encoding_version smallint NOT NULL,
    actor_kind smallint NOT NULL,
    actor_id uuid,
    acting_entity_id uuid,
    service text NOT NULL,
    action text NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    outcome smallint NOT NULL,
    status_code text NOT NULL,
    reason text NOT NULL,
    permission text NOT NULL,
    request_id text NOT NULL,
    trace_id text NOT NULL,
    client_address text NOT NULL,
    occur_time timestamptz NOT NULL,
    record_time timestamptz NOT NULL,
    changes text NOT NULL,
    details text NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL,
    content_digest bytea NOT NULL,
    PRIMARY KEY (entity_id, sequence),
    CONSTRAINT audit_events_id_key UNIQUE (id)
);
-- QueryEvents: newest first within entities, then the other filters.
CREATE INDEX audit_events_entity_time ON audit_events (entity_id, occur_time, id);
CREATE INDEX audit_events_actor_time ON audit_events (actor_id, occur_time) WHERE actor_id IS NOT NULL;
CREATE INDEX audit_events_resource_time ON audit_events (resource_id, occur_time) WHERE resource_id <> '';
CREATE INDEX audit_events_request ON audit_events (request_id) WHERE request_id <> '';
CREATE INDEX audit_events_trace ON audit_events (trace_id) WHERE trace_id <> '';
-- VerifyChain and ExportEvents by time.
CREATE INDEX audit_events_entity_record_time ON audit_events (entity_id, record_time);

CREATE TABLE audit_checkpoints (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    sequence bigint NOT NULL,
    head_hash text NOT NULL,
    signing_key_id text NOT NULL,
    algorithm text NOT NULL,
    signed_payload text NOT NULL,
    signature bytea NOT NULL,
    create_time timestamptz NOT NULL
);
CREATE INDEX audit_checkpoints_entity_sequence ON audit_checkpoints (entity_id, sequence);
CREATE INDEX audit_checkpoints_entity_time ON audit_checkpoints (entity_id, create_time, id);

-- Public halves of the checkpoint keys, current and retired.
CREATE TABLE audit_signing_keys (
    id text PRIMARY KEY,
    algorithm text NOT NULL,
    public_key bytea NOT NULL,
    activate_time timestamptz NOT NULL DEFAULT now(),
    retire_time timestamptz
);

-- Per-subject keys, wrapped by a key-encryption key. Deleting a subject's
-- rows is the erasure (crypto-shredding): not an entity-scoped table.
CREATE TABLE audit_subject_keys (
    id uuid PRIMARY KEY,
    subject_id text NOT NULL,
    kek_id text NOT NULL,
    wrapped bytea NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT audit_subject_keys_subject_key UNIQUE (subject_id)
);

-- Append-only, for every role including the owner: UPDATE, DELETE and
-- TRUNCATE of events and checkpoints are refused. (The application role
-- also loses the privileges at start-up: `socle_audit::restrict_app_role`.)
CREATE FUNCTION audit_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reject_change();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reject_change();

-- Row-level security: a transaction sees the chains of its scope only.
ALTER TABLE audit_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY audit_events_entity_scope ON audit_events
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
ALTER TABLE audit_chains ENABLE ROW LEVEL SECURITY;
CREATE POLICY audit_chains_entity_scope ON audit_chains
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
ALTER TABLE audit_checkpoints ENABLE ROW LEVEL SECURITY;
CREATE POLICY audit_checkpoints_entity_scope ON audit_checkpoints
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
