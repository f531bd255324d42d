-- Development only: events stored with `erase_subject_ids` no longer verify
-- once the column is gone (the ids are part of their hash).
DROP TABLE audit_erased_subjects;
ALTER TABLE audit_events DROP COLUMN erase_subject_ids;
