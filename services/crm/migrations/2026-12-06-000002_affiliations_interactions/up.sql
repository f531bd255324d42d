-- What the affiliation and interaction services need beyond the core
-- schema: the order of an interaction's contacts, accent-insensitive full
-- text over interactions, and the indexes of their lists.
--
-- "At most one current affiliation per contact and organisation" depends on
-- today's date, so no index can enforce it: the service checks it under an
-- advisory lock on the pair (see affiliations.rs).

-- The contacts of an interaction keep the order they were given in.
ALTER TABLE interaction_contacts ADD COLUMN ordinal smallint NOT NULL DEFAULT 0;

-- Full text over the subject and the body, accents and case ignored.
ALTER TABLE interactions ADD COLUMN search_vector tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('french'::regconfig, socle_fold(subject)), 'A')
    || setweight(to_tsvector('french'::regconfig, socle_fold(left(body, 20000))), 'D')
) STORED;
CREATE INDEX interactions_search ON interactions USING gin (search_vector);
CREATE INDEX interactions_tags ON interactions USING gin (tags);
CREATE INDEX interactions_author ON interactions (author_id, occur_time DESC, id DESC) WHERE author_id <> '';

-- Current links of an organisation (contact counts, timelines including
-- the interactions of its current contacts).
CREATE INDEX affiliations_organization_current ON affiliations (organization_id, end_date);
