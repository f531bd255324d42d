-- Merges of organisations and contacts, kept so that they can be undone:
-- the target as it was before and right after the merge (protobuf
-- encodings), the field choices, and every row the merge moved or removed
-- (`moved`: [{"table", "id" | "interaction_id", "column", "from", "deleted"}]).
-- Merged source records stay in their tables in the MERGED state.
CREATE TABLE merges (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    record_kind smallint NOT NULL CHECK (record_kind IN (1, 2)),
    target_id uuid NOT NULL,
    source_ids uuid[] NOT NULL CHECK (cardinality(source_ids) BETWEEN 1 AND 10),
    field_choices jsonb NOT NULL DEFAULT '[]',
    impact jsonb NOT NULL DEFAULT '{}',
    target_before bytea NOT NULL,
    target_after bytea NOT NULL,
    moved jsonb NOT NULL DEFAULT '[]',
    state smallint NOT NULL DEFAULT 1 CHECK (state IN (1, 2)),
    creator_kind smallint NOT NULL DEFAULT 0,
    creator_id text NOT NULL DEFAULT '',
    undoer_kind smallint NOT NULL DEFAULT 0,
    undoer_id text NOT NULL DEFAULT '',
    undo_time timestamptz,
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE merges ENABLE ROW LEVEL SECURITY;
CREATE POLICY merges_entity_scope ON merges
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
CREATE INDEX merges_entity ON merges (entity_id, create_time DESC, id DESC);
CREATE INDEX merges_target ON merges (target_id);
CREATE INDEX merges_sources ON merges USING gin (source_ids);
