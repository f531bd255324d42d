DROP TABLE audit_subject_keys;
DROP TABLE audit_signing_keys;
DROP TABLE audit_checkpoints;
DROP TABLE audit_events;
DROP TABLE audit_chains;
DROP FUNCTION audit_reject_change();
