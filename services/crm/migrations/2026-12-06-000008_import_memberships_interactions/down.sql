DELETE FROM import_jobs WHERE record_kind IN (4, 5);
ALTER TABLE import_rows DROP CONSTRAINT import_rows_record_kind_check,
    ADD CONSTRAINT import_rows_record_kind_check CHECK (record_kind IN (1, 2));
ALTER TABLE import_jobs DROP CONSTRAINT import_jobs_record_kind_check,
    ADD CONSTRAINT import_jobs_record_kind_check CHECK (record_kind IN (1, 2));
