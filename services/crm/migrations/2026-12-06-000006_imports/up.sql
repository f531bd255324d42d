-- CSV imports: one job per run of an import, and the per-row report of
-- each job. Rows are identified within their import key by a hash of their
-- content: a row written once (created or updated) is never written again
-- by a later run with the same key, which reports it `UNCHANGED`.
CREATE TABLE import_jobs (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    -- RecordKind: 1 organisations, 2 contacts.
    record_kind smallint NOT NULL CHECK (record_kind IN (1, 2)),
    import_key text NOT NULL CHECK (import_key <> '' AND length(import_key) <= 200),
    mode smallint NOT NULL CHECK (mode IN (1, 2)),
    duplicate_policy smallint NOT NULL CHECK (duplicate_policy IN (1, 2, 3)),
    dry_run boolean NOT NULL,
    state smallint NOT NULL CHECK (state BETWEEN 1 AND 5),
    total_count bigint NOT NULL DEFAULT 0,
    created_count bigint NOT NULL DEFAULT 0,
    updated_count bigint NOT NULL DEFAULT 0,
    unchanged_count bigint NOT NULL DEFAULT 0,
    rejected_count bigint NOT NULL DEFAULT 0,
    valid_count bigint NOT NULL DEFAULT 0,
    filename text NOT NULL DEFAULT '',
    size_bytes bigint NOT NULL DEFAULT 0,
    -- SHA-256 of the uploaded bytes, lowercase hex.
    file_sha256 text NOT NULL,
    -- The options that, with the file, make a run the same run again.
    encoding smallint NOT NULL DEFAULT 0,
    delimiter text NOT NULL DEFAULT '',
    columns text[] NOT NULL DEFAULT '{}',
    error text NOT NULL DEFAULT '',
    creator_kind smallint NOT NULL DEFAULT 0,
    creator_id text NOT NULL DEFAULT '',
    complete_time timestamptz,
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE import_jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY import_jobs_entity_scope ON import_jobs
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
CREATE INDEX import_jobs_entity ON import_jobs (entity_id, create_time DESC, id DESC);
-- Finding the first run of the same file with the same key and options.
CREATE INDEX import_jobs_runs ON import_jobs (entity_id, record_kind, import_key, file_sha256);

CREATE TABLE import_rows (
    import_job_id uuid NOT NULL REFERENCES import_jobs (id) ON DELETE CASCADE,
    entity_id uuid NOT NULL,
    record_kind smallint NOT NULL CHECK (record_kind IN (1, 2)),
    import_key text NOT NULL,
    -- The row's line number in the file (the header row is line 1).
    row_number bigint NOT NULL CHECK (row_number > 0),
    -- SHA-256 of the row's mapped cells, lowercase hex.
    content_hash text NOT NULL,
    -- ImportRowOutcome: 1 created, 2 updated, 3 unchanged, 4 rejected, 5 valid.
    outcome smallint NOT NULL CHECK (outcome BETWEEN 1 AND 5),
    record_id uuid,
    -- [{"field", "reason", "description"}], fields named by CSV column.
    violations jsonb NOT NULL DEFAULT '[]',
    -- The duplicate candidates that rejected the row (DuplicateCandidate fields).
    duplicates jsonb NOT NULL DEFAULT '[]',
    PRIMARY KEY (import_job_id, row_number)
);
ALTER TABLE import_rows ENABLE ROW LEVEL SECURITY;
CREATE POLICY import_rows_entity_scope ON import_rows
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
-- A row's content is loaded (created or updated) at most once per import
-- key: what makes re-runs safe.
CREATE UNIQUE INDEX import_rows_loaded ON import_rows (entity_id, record_kind, import_key, content_hash)
    WHERE outcome IN (1, 2);
