-- A tenant-owned table protected the way every service protects its own.
CREATE TABLE things (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    label text NOT NULL UNIQUE CHECK (label <> '')
);
ALTER TABLE things ENABLE ROW LEVEL SECURITY;
CREATE POLICY things_entity_scope ON things
    USING (socle_entity_visible(entity_id))
    WITH CHECK (socle_entity_visible(entity_id));
