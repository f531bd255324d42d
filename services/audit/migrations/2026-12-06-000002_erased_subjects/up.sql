-- Erasure by event (ADR 0011): `AuditEvent.erase_subject_ids`.

-- The subjects an event erases, as stored and hashed: the canonical JSON
-- array of the ids, `[]` for the events that erase nobody (whose canonical
-- encoding, hence hash, is the one they had before this column existed).
ALTER TABLE audit_events ADD COLUMN erase_subject_ids text NOT NULL DEFAULT '[]';

-- Tombstones: the data subjects erased, once and for all. Written in the
-- transaction that deletes their keys (`audit_subject_keys`); personal values
-- of a tombstoned subject arriving later are sealed under a key that is
-- never stored, and no key is ever created for the subject again. Like the
-- subject keys, not entity-scoped: a person's key is shared by every chain.
CREATE TABLE audit_erased_subjects (
    subject_id text PRIMARY KEY,
    -- The event that erased the subject first; NULL when erased by
    -- `Store::shred_subject` (no event).
    event_id uuid,
    erase_time timestamptz NOT NULL DEFAULT now()
);

-- Append-only like the events and checkpoints: a tombstone removed would let
-- the next personal values of the person be stored readable. (The
-- application role also loses UPDATE, DELETE and TRUNCATE on it at start-up:
-- `socle_audit::restrict_app_role`.)
CREATE TRIGGER audit_erased_subjects_append_only BEFORE UPDATE OR DELETE ON audit_erased_subjects
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change();
CREATE TRIGGER audit_erased_subjects_no_truncate BEFORE TRUNCATE ON audit_erased_subjects
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reject_change();
