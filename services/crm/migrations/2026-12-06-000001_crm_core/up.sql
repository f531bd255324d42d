-- The CRM core: organisations, contacts, the links between them,
-- membership types and memberships, interactions. Every table carries the
-- owning entity and is protected by row-level security through the
-- caller's scope (`socle_entity_visible`, installed by socle-db): a query
-- that forgets its entity filter still sees only allowed rows.
--
-- Text search: `socle_fold` (accent- and case-insensitive, immutable) feeds
-- stored generated columns, French full text (`tsvector`) and pg_trgm
-- trigram indexes for fuzzy matching of names and e-mails.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- The words of a text array, space-separated (array_to_string is only
-- STABLE, and generated columns and index expressions need IMMUTABLE).
CREATE FUNCTION crm_join(words text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT coalesce(array_to_string(words, ' '), '') $$;

-- Organisations -------------------------------------------------------------

CREATE TABLE organizations (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    legal_name text NOT NULL CHECK (legal_name <> '' AND length(legal_name) <= 200),
    trade_name text NOT NULL DEFAULT '',
    siren text CHECK (siren ~ '^[0-9]{9}$'),
    siret text CHECK (siret ~ '^[0-9]{14}$' AND (siren IS NULL OR left(siret, 9) = siren)),
    naf_code text CHECK (naf_code ~ '^[0-9]{2}\.[0-9]{2}[A-Z]$'),
    legal_form_code text CHECK (legal_form_code ~ '^[1-9][0-9]{3}$'),
    headcount_band smallint NOT NULL DEFAULT 0,
    -- [{kind, primary, street_line, complement, distribution, postal_code,
    --   city, cedex, insee_code, department_code, country_code}]
    addresses jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(addresses) = 'array'),
    website text NOT NULL DEFAULT '',
    email text NOT NULL DEFAULT '',
    phone text NOT NULL DEFAULT '',
    tags text[] NOT NULL DEFAULT '{}',
    description text NOT NULL DEFAULT '',
    external_refs jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(external_refs) = 'object'),
    state smallint NOT NULL DEFAULT 1 CHECK (state IN (1, 2)),
    merged_into_id uuid REFERENCES organizations (id),
    -- The primary address, for filters, ordering and duplicate detection.
    postal_code text NOT NULL DEFAULT '',
    city text NOT NULL DEFAULT '',
    department_code text NOT NULL DEFAULT '',
    -- The membership series, maintained by crm_refresh_membership(): the
    -- latest membership and the start of the uninterrupted series ending
    -- with it. The status itself depends on today's date and is computed
    -- when read (crm_membership_status).
    latest_membership_id uuid,
    latest_membership_type_id uuid,
    latest_membership_start date,
    latest_membership_end date,
    latest_membership_grace_end date,
    latest_membership_cancelled boolean NOT NULL DEFAULT false,
    member_since date,
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    name_key text GENERATED ALWAYS AS (socle_fold(legal_name)) STORED,
    trade_key text GENERATED ALWAYS AS (socle_fold(trade_name)) STORED,
    email_key text GENERATED ALWAYS AS (lower(email)) STORED,
    city_key text GENERATED ALWAYS AS (socle_fold(city)) STORED,
    search_vector tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('french'::regconfig, socle_fold(legal_name || ' ' || trade_name)), 'A')
        || setweight(to_tsvector('simple'::regconfig, coalesce(siren, '') || ' ' || coalesce(siret, '')), 'A')
        || setweight(to_tsvector('french'::regconfig, socle_fold(city || ' ' || crm_join(tags))), 'B')
        || setweight(to_tsvector('french'::regconfig, socle_fold(left(description, 2000))), 'D')
    ) STORED
);
ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
CREATE POLICY organizations_entity_scope ON organizations
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
-- Keyset orders, per entity and across entities (subtrees).
CREATE INDEX organizations_entity_name ON organizations (entity_id, name_key, id);
CREATE INDEX organizations_name ON organizations (name_key, id);
CREATE INDEX organizations_entity_update ON organizations (entity_id, update_time DESC, id DESC);
CREATE INDEX organizations_entity_create ON organizations (entity_id, create_time DESC, id DESC);
-- Filters and duplicate detection.
CREATE INDEX organizations_siren ON organizations (siren) WHERE siren IS NOT NULL;
CREATE INDEX organizations_siret ON organizations (siret) WHERE siret IS NOT NULL;
CREATE INDEX organizations_email ON organizations (email_key) WHERE email_key <> '';
CREATE INDEX organizations_phone ON organizations (phone) WHERE phone <> '';
CREATE INDEX organizations_postal ON organizations (postal_code text_pattern_ops);
CREATE INDEX organizations_department ON organizations (entity_id, department_code);
CREATE INDEX organizations_naf ON organizations (naf_code text_pattern_ops);
CREATE INDEX organizations_tags ON organizations USING gin (tags);
CREATE INDEX organizations_search ON organizations USING gin (search_vector);
CREATE INDEX organizations_name_trgm ON organizations USING gin (name_key gin_trgm_ops);
CREATE INDEX organizations_trade_trgm ON organizations USING gin (trade_key gin_trgm_ops);
CREATE INDEX organizations_merged ON organizations (merged_into_id) WHERE merged_into_id IS NOT NULL;

-- Contacts ------------------------------------------------------------------

CREATE TABLE contacts (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    civility smallint NOT NULL DEFAULT 0,
    given_name text NOT NULL DEFAULT '',
    family_name text NOT NULL DEFAULT '',
    job_title text NOT NULL DEFAULT '',
    -- [{address, kind, primary}] / [{number, kind, primary}]
    emails jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(emails) = 'array'),
    phones jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(phones) = 'array'),
    address jsonb,
    -- [{topic, channel, granted, source, record_time}]
    consents jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(consents) = 'array'),
    tags text[] NOT NULL DEFAULT '{}',
    external_refs jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(external_refs) = 'object'),
    state smallint NOT NULL DEFAULT 1 CHECK (state IN (1, 2, 3)),
    merged_into_id uuid REFERENCES contacts (id),
    erase_time timestamptz,
    -- Lower-cased e-mail addresses and E.164 numbers, for duplicate
    -- detection (maintained by the service with `emails` and `phones`).
    email_keys text[] NOT NULL DEFAULT '{}',
    phone_keys text[] NOT NULL DEFAULT '{}',
    postal_code text NOT NULL DEFAULT '',
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    CHECK (state = 3 OR family_name <> '' OR given_name <> ''),
    name_key text GENERATED ALWAYS AS (socle_fold(family_name || ' ' || given_name)) STORED,
    search_vector tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('simple'::regconfig, socle_fold(given_name || ' ' || family_name)), 'A')
        || setweight(to_tsvector('simple'::regconfig, crm_join(email_keys)), 'A')
        || setweight(to_tsvector('french'::regconfig, socle_fold(job_title || ' ' || crm_join(tags))), 'C')
    ) STORED
);
ALTER TABLE contacts ENABLE ROW LEVEL SECURITY;
CREATE POLICY contacts_entity_scope ON contacts
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
CREATE INDEX contacts_entity_name ON contacts (entity_id, name_key, id);
CREATE INDEX contacts_name ON contacts (name_key, id);
CREATE INDEX contacts_entity_update ON contacts (entity_id, update_time DESC, id DESC);
CREATE INDEX contacts_entity_create ON contacts (entity_id, create_time DESC, id DESC);
CREATE INDEX contacts_email_keys ON contacts USING gin (email_keys);
CREATE INDEX contacts_phone_keys ON contacts USING gin (phone_keys);
CREATE INDEX contacts_tags ON contacts USING gin (tags);
CREATE INDEX contacts_search ON contacts USING gin (search_vector);
CREATE INDEX contacts_name_trgm ON contacts USING gin (name_key gin_trgm_ops);
CREATE INDEX contacts_email_trgm ON contacts USING gin ((crm_join(email_keys)) gin_trgm_ops);
CREATE INDEX contacts_merged ON contacts (merged_into_id) WHERE merged_into_id IS NOT NULL;

-- Affiliations: a contact at an organisation -------------------------------

CREATE TABLE affiliations (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    contact_id uuid NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    roles smallint[] NOT NULL DEFAULT '{}',
    job_title text NOT NULL DEFAULT '',
    start_date date,
    end_date date CHECK (end_date IS NULL OR start_date IS NULL OR end_date >= start_date),
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE affiliations ENABLE ROW LEVEL SECURITY;
CREATE POLICY affiliations_entity_scope ON affiliations
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
CREATE INDEX affiliations_organization ON affiliations (organization_id, contact_id);
CREATE INDEX affiliations_contact ON affiliations (contact_id, organization_id);
CREATE INDEX affiliations_entity ON affiliations (entity_id, create_time DESC, id DESC);

-- Membership types and memberships -----------------------------------------

CREATE TABLE membership_types (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    code text NOT NULL CHECK (code ~ '^[A-Z0-9][A-Z0-9_-]{0,31}$'),
    display_name text NOT NULL CHECK (display_name <> ''),
    description text NOT NULL DEFAULT '',
    yearly_dues_cents bigint NOT NULL DEFAULT 0 CHECK (yearly_dues_cents >= 0),
    currency_code text NOT NULL DEFAULT 'EUR',
    -- [{headcount_band, amount_cents}]
    dues_brackets jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(dues_brackets) = 'array'),
    period_kind smallint NOT NULL DEFAULT 1 CHECK (period_kind IN (1, 2)),
    grace_period_days integer NOT NULL DEFAULT 90 CHECK (grace_period_days BETWEEN 0 AND 366),
    offered_to_descendants boolean NOT NULL DEFAULT true,
    archived boolean NOT NULL DEFAULT false,
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    UNIQUE (entity_id, code)
);
ALTER TABLE membership_types ENABLE ROW LEVEL SECURITY;
CREATE POLICY membership_types_entity_scope ON membership_types
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));

CREATE TABLE memberships (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    membership_type_id uuid NOT NULL REFERENCES membership_types (id),
    start_date date NOT NULL,
    end_date date NOT NULL CHECK (end_date >= start_date),
    grace_end_date date NOT NULL CHECK (grace_end_date >= end_date),
    dues_cents bigint NOT NULL CHECK (dues_cents >= 0),
    paid_cents bigint NOT NULL DEFAULT 0 CHECK (paid_cents >= 0),
    currency_code text NOT NULL DEFAULT 'EUR',
    payment_status smallint NOT NULL DEFAULT 1 CHECK (payment_status BETWEEN 1 AND 5),
    payment_date date,
    payment_reference text NOT NULL DEFAULT '',
    notes text NOT NULL DEFAULT '',
    previous_membership_id uuid REFERENCES memberships (id) ON DELETE SET NULL,
    cancel_date date,
    cancel_reason text NOT NULL DEFAULT '',
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE memberships ENABLE ROW LEVEL SECURITY;
CREATE POLICY memberships_entity_scope ON memberships
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
CREATE INDEX memberships_organization ON memberships (organization_id, start_date DESC);
CREATE INDEX memberships_type ON memberships (membership_type_id);
CREATE UNIQUE INDEX memberships_previous ON memberships (previous_membership_id) WHERE previous_membership_id IS NOT NULL;
CREATE INDEX memberships_entity_end ON memberships (entity_id, end_date, id);

-- The status of a membership series on `today` (MembershipStatus values).
CREATE FUNCTION crm_membership_status(
    latest uuid, cancelled boolean, series_start date, series_end date, grace_end date, today date
) RETURNS smallint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN latest IS NULL THEN 1
        WHEN cancelled THEN 6
        WHEN today < series_start THEN 2
        WHEN today <= series_end THEN 3
        WHEN today <= grace_end THEN 4
        ELSE 5
    END::smallint
$$;

-- Recomputes an organisation's membership series from its memberships: the
-- latest period (by start date) and the start of the uninterrupted series
-- of periods ending with it (each starting at most the day after the
-- previous one ends, none cancelled). Called in every transaction that
-- writes memberships.
CREATE FUNCTION crm_refresh_membership(organization uuid) RETURNS void LANGUAGE sql AS $$
    WITH RECURSIVE latest AS (
        SELECT m.* FROM memberships m WHERE m.organization_id = organization
        ORDER BY m.start_date DESC, m.create_time DESC LIMIT 1
    ), series AS (
        SELECT id, start_date FROM latest WHERE cancel_date IS NULL
        UNION
        SELECT p.id, p.start_date FROM memberships p JOIN series s ON true
         WHERE p.organization_id = organization AND p.cancel_date IS NULL AND p.id <> s.id
           AND p.start_date < s.start_date AND p.end_date >= s.start_date - 1
    )
    UPDATE organizations o SET
        latest_membership_id = l.id,
        latest_membership_type_id = l.membership_type_id,
        latest_membership_start = l.start_date,
        latest_membership_end = l.end_date,
        latest_membership_grace_end = l.grace_end_date,
        latest_membership_cancelled = coalesce(l.cancel_date IS NOT NULL, false),
        member_since = (SELECT min(start_date) FROM series)
    FROM (SELECT 1) AS one LEFT JOIN latest l ON true
    WHERE o.id = organization
$$;

-- Interactions --------------------------------------------------------------

CREATE TABLE interactions (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    kind smallint NOT NULL CHECK (kind BETWEEN 1 AND 5),
    subject text NOT NULL CHECK (subject <> '' AND length(subject) <= 300),
    body text NOT NULL DEFAULT '',
    occur_time timestamptz NOT NULL,
    duration_seconds integer CHECK (duration_seconds IS NULL OR duration_seconds >= 0),
    direction smallint NOT NULL DEFAULT 0,
    organization_id uuid REFERENCES organizations (id) ON DELETE SET NULL,
    event_name text NOT NULL DEFAULT '',
    location text NOT NULL DEFAULT '',
    participant_user_ids uuid[] NOT NULL DEFAULT '{}',
    tags text[] NOT NULL DEFAULT '{}',
    author_kind smallint NOT NULL DEFAULT 0,
    author_id text NOT NULL DEFAULT '',
    version bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE interactions ENABLE ROW LEVEL SECURITY;
CREATE POLICY interactions_entity_scope ON interactions
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
CREATE INDEX interactions_organization ON interactions (organization_id, occur_time DESC, id DESC);
CREATE INDEX interactions_entity ON interactions (entity_id, occur_time DESC, id DESC);

CREATE TABLE interaction_contacts (
    interaction_id uuid NOT NULL REFERENCES interactions (id) ON DELETE CASCADE,
    contact_id uuid NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    entity_id uuid NOT NULL,
    PRIMARY KEY (interaction_id, contact_id)
);
ALTER TABLE interaction_contacts ENABLE ROW LEVEL SECURITY;
CREATE POLICY interaction_contacts_entity_scope ON interaction_contacts
    USING (socle_entity_visible(entity_id)) WITH CHECK (socle_entity_visible(entity_id));
CREATE INDEX interaction_contacts_contact ON interaction_contacts (contact_id, interaction_id);

-- Duplicate hints across entities -------------------------------------------

-- Organisations that look like a candidate, in every entity. Runs as the
-- owner (SECURITY DEFINER: row-level security does not hide other
-- entities), so it returns nothing but an id, its entity, the reasons and a
-- score: the service reveals the id only when the caller may read the
-- entity, and otherwise flags "a duplicate exists in another entity".
CREATE FUNCTION crm_organization_duplicate_hints(
    p_siren text, p_siret text, p_email text, p_phone text, p_name_key text, p_postal_code text,
    p_exclude uuid, p_limit integer
) RETURNS TABLE (id uuid, entity_id uuid, reasons smallint[], score double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH hits AS (
        SELECT o.id, o.entity_id, 2::smallint AS reason, 1.0::double precision AS score
          FROM organizations o WHERE p_siret <> '' AND o.siret = p_siret
        UNION ALL
        SELECT o.id, o.entity_id, 1::smallint, 0.9 FROM organizations o WHERE p_siren <> '' AND o.siren = p_siren
        UNION ALL
        SELECT o.id, o.entity_id, 3::smallint, 0.8 FROM organizations o WHERE p_email <> '' AND o.email_key = p_email
        UNION ALL
        SELECT o.id, o.entity_id, 4::smallint, 0.7 FROM organizations o WHERE p_phone <> '' AND o.phone = p_phone
        UNION ALL
        SELECT o.id, o.entity_id, 5::smallint, 0.4 + 0.5 * similarity(o.name_key, p_name_key)
          FROM organizations o
         WHERE p_postal_code <> '' AND p_name_key <> '' AND o.postal_code = p_postal_code
           AND similarity(o.name_key, p_name_key) >= 0.45
    )
    SELECT h.id, h.entity_id, array_agg(h.reason ORDER BY h.score DESC, h.reason),
           least(1.0, max(h.score) + 0.05 * (count(*) - 1))
      FROM hits h JOIN organizations o ON o.id = h.id
     WHERE o.state = 1 AND (p_exclude IS NULL OR h.id <> p_exclude)
     GROUP BY h.id, h.entity_id
     ORDER BY 4 DESC, h.id
     LIMIT p_limit
$$;

-- The same for contacts: same e-mail, same phone, similar name with the
-- same postal code.
CREATE FUNCTION crm_contact_duplicate_hints(
    p_emails text[], p_phones text[], p_name_key text, p_postal_code text, p_exclude uuid, p_limit integer
) RETURNS TABLE (id uuid, entity_id uuid, reasons smallint[], score double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH hits AS (
        SELECT c.id, c.entity_id, 3::smallint AS reason, 0.95::double precision AS score
          FROM contacts c WHERE cardinality(p_emails) > 0 AND c.email_keys && p_emails
        UNION ALL
        SELECT c.id, c.entity_id, 4::smallint, 0.75 FROM contacts c
         WHERE cardinality(p_phones) > 0 AND c.phone_keys && p_phones
        UNION ALL
        SELECT c.id, c.entity_id, 5::smallint, 0.4 + 0.5 * similarity(c.name_key, p_name_key)
          FROM contacts c
         WHERE p_postal_code <> '' AND p_name_key <> '' AND c.postal_code = p_postal_code
           AND similarity(c.name_key, p_name_key) >= 0.6
    )
    SELECT h.id, h.entity_id, array_agg(h.reason ORDER BY h.score DESC, h.reason),
           least(1.0, max(h.score) + 0.05 * (count(*) - 1))
      FROM hits h JOIN contacts c ON c.id = h.id
     WHERE c.state = 1 AND (p_exclude IS NULL OR h.id <> p_exclude)
     GROUP BY h.id, h.entity_id
     ORDER BY 4 DESC, h.id
     LIMIT p_limit
$$;
REVOKE ALL ON FUNCTION crm_organization_duplicate_hints FROM PUBLIC;
REVOKE ALL ON FUNCTION crm_contact_duplicate_hints FROM PUBLIC;
