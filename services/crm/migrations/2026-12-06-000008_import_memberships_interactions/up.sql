-- CSV imports of memberships (RecordKind 4) and interactions (5), besides
-- organisations (1) and contacts (2): jobs and row reports of those kinds.
ALTER TABLE import_jobs DROP CONSTRAINT import_jobs_record_kind_check,
    ADD CONSTRAINT import_jobs_record_kind_check CHECK (record_kind IN (1, 2, 4, 5));
ALTER TABLE import_rows DROP CONSTRAINT import_rows_record_kind_check,
    ADD CONSTRAINT import_rows_record_kind_check CHECK (record_kind IN (1, 2, 4, 5));
