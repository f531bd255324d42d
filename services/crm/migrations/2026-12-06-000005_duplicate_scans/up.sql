-- Batch duplicate scans and the pairs they find. A pair joins two records
-- of the same entity (a merge needs both in one entity), the older first;
-- it is found again by later scans unless dismissed or merged.
CREATE TABLE duplicate_scans (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    include_descendants boolean NOT NULL DEFAULT false,
    -- The entities compared (the entity, or the part of its subtree the
    -- caller could read when the scan started).
    entity_ids uuid[] NOT NULL,
    record_kinds smallint[] NOT NULL,
    min_score double precision NOT NULL CHECK (min_score BETWEEN 0 AND 1),
    state smallint NOT NULL DEFAULT 1 CHECK (state BETWEEN 1 AND 4),
    scanned_record_count bigint NOT NULL DEFAULT 0,
    pair_count bigint NOT NULL DEFAULT 0,
    error text NOT NULL DEFAULT '',
    creator_kind smallint NOT NULL DEFAULT 0,
    creator_id text NOT NULL DEFAULT '',
    complete_time timestamptz,
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE duplicate_scans ENABLE ROW LEVEL SECURITY;
CREATE POLICY duplicate_scans_entity_scope ON duplicate_scans
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
CREATE INDEX duplicate_scans_entity ON duplicate_scans (entity_id, create_time DESC, id DESC);
CREATE INDEX duplicate_scans_unfinished ON duplicate_scans (state) WHERE state IN (1, 2);

CREATE TABLE duplicate_pairs (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    duplicate_scan_id uuid REFERENCES duplicate_scans (id) ON DELETE SET NULL,
    record_kind smallint NOT NULL CHECK (record_kind IN (1, 2)),
    first_record_id uuid NOT NULL,
    second_record_id uuid NOT NULL,
    score double precision NOT NULL,
    reasons smallint[] NOT NULL,
    state smallint NOT NULL DEFAULT 1 CHECK (state IN (1, 2, 3)),
    merge_id uuid,
    dismiss_reason text NOT NULL DEFAULT '',
    resolver_kind smallint NOT NULL DEFAULT 0,
    resolver_id text NOT NULL DEFAULT '',
    resolve_time timestamptz,
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    CHECK (first_record_id <> second_record_id),
    UNIQUE (record_kind, first_record_id, second_record_id)
);
ALTER TABLE duplicate_pairs ENABLE ROW LEVEL SECURITY;
CREATE POLICY duplicate_pairs_entity_scope ON duplicate_pairs
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
CREATE INDEX duplicate_pairs_entity_score ON duplicate_pairs (entity_id, state, score DESC, id);
CREATE INDEX duplicate_pairs_first ON duplicate_pairs (first_record_id);
CREATE INDEX duplicate_pairs_second ON duplicate_pairs (second_record_id);
