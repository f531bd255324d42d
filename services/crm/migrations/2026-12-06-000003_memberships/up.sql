-- What the membership and membership type services need beyond the core
-- schema.
--
-- 1. Types offered to descendants. `membership_types` rows are visible in
--    the caller's entity scope only, and a branch's scope does not include
--    the national or regional entity that offers a type to its descendants.
--    The service puts the acting entity's ancestors (from tenancy) in the
--    transaction-local setting `socle.crm_ancestors`; a second, SELECT-only
--    policy lets the rows of those ancestors that are offered to
--    descendants be read. Permissive policies add up for SELECT only:
--    UPDATE and DELETE still need the owning entity in the scope (the
--    `membership_types_entity_scope` policy, whose WITH CHECK is unchanged),
--    so a branch can use an ancestor's type but never change it.
--
-- 2. Statuses. The core's crm_membership_status() made an organisation
--    CANCELLED as soon as its latest membership had a cancellation, even one
--    taking effect months later, and crm_refresh_membership() chose a
--    membership cancelled from its first day over the period actually in
--    force, and dropped `member_since` of a cancelled series. Both are
--    replaced (same signature, so that every caller keeps working):
--    - the effective end of a period is the day before its cancellation
--      takes effect, when cancelled, else its end date;
--    - the latest membership is the one starting last among those that were
--      in force for at least a day (a period cancelled from its start only
--      counts when there is nothing else);
--    - `latest_membership_end` is the latest membership's effective end and
--      `latest_membership_grace_end` the last day it still counts (for a
--      cancelled one, at most the day before the cancellation);
--    - `member_since` is the start of the uninterrupted series ending with
--      the latest membership (each period starting at most the day after the
--      previous one's effective end).
--    Limitation: the organisation's status follows its latest period; a
--    future period separated from the current one by a gap makes it
--    UPCOMING until that period starts.
--    Memberships themselves get crm_membership_period_status(): a renewed
--    period has no grace period (its successor takes over), and a cancelled
--    one is CANCELLED from its cancellation date only.

CREATE FUNCTION crm_ancestors() RETURNS uuid[]
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN coalesce(current_setting('socle.crm_ancestors', true), '') = '' THEN '{}'::uuid[]
        ELSE string_to_array(current_setting('socle.crm_ancestors', true), ',')::uuid[]
    END
$$;

CREATE POLICY membership_types_offered ON membership_types FOR SELECT
    USING (offered_to_descendants AND entity_id = ANY (crm_ancestors()));

-- The status of one membership period on `today` (MembershipStatus values).
CREATE FUNCTION crm_membership_period_status(
    start_date date, end_date date, grace_end date, cancel_date date, renewed boolean, today date
) RETURNS smallint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN cancel_date IS NOT NULL AND today >= cancel_date THEN 6
        WHEN today < start_date THEN 2
        WHEN today <= end_date THEN 3
        WHEN NOT renewed AND today <= grace_end THEN 4
        ELSE 5
    END::smallint
$$;

-- The status of an organisation's membership series on `today`: see (2).
CREATE OR REPLACE FUNCTION crm_membership_status(
    latest uuid, cancelled boolean, series_start date, series_end date, grace_end date, today date
) RETURNS smallint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN latest IS NULL THEN 1
        WHEN cancelled AND today > grace_end THEN 6
        WHEN today < series_start THEN 2
        WHEN today <= series_end THEN 3
        WHEN today <= grace_end THEN 4
        ELSE 5
    END::smallint
$$;

CREATE OR REPLACE FUNCTION crm_refresh_membership(organization uuid) RETURNS void LANGUAGE sql AS $$
    WITH RECURSIVE periods AS (
        SELECT m.id, m.membership_type_id, m.start_date, m.end_date, m.grace_end_date, m.cancel_date,
               m.create_time,
               CASE WHEN m.cancel_date IS NULL THEN m.end_date
                    ELSE least(m.end_date, m.cancel_date - 1) END AS effective_end
          FROM memberships m WHERE m.organization_id = organization
    ), latest AS (
        SELECT * FROM periods
         ORDER BY (effective_end >= start_date) DESC, start_date DESC, create_time DESC, id DESC
         LIMIT 1
    ), series AS (
        SELECT id, start_date FROM latest
        UNION
        SELECT p.id, p.start_date FROM periods p JOIN series s
            ON p.start_date < s.start_date AND p.effective_end >= s.start_date - 1
         WHERE p.effective_end >= p.start_date
    )
    UPDATE organizations o SET
        latest_membership_id = l.id,
        latest_membership_type_id = l.membership_type_id,
        latest_membership_start = l.start_date,
        latest_membership_end = l.effective_end,
        latest_membership_grace_end = CASE WHEN l.cancel_date IS NULL THEN l.grace_end_date
                                           ELSE least(l.grace_end_date, l.cancel_date - 1) END,
        latest_membership_cancelled = coalesce(l.cancel_date IS NOT NULL, false),
        member_since = (SELECT min(start_date) FROM series)
    FROM (SELECT 1) AS one LEFT JOIN latest l ON true
    WHERE o.id = organization
$$;

-- Whether memberships use a type, in every entity (the owner's check before
-- deleting it or withdrawing it from its descendants). Runs as the owner
-- (SECURITY DEFINER: row-level security does not hide the descendants'
-- memberships) and reveals two counts only.
CREATE FUNCTION crm_membership_type_usage(p_type uuid, OUT total bigint, OUT elsewhere bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT count(m.id), count(m.id) FILTER (WHERE m.entity_id <> t.entity_id)
      FROM membership_types t LEFT JOIN memberships m ON m.membership_type_id = t.id
     WHERE t.id = p_type
$$;
REVOKE ALL ON FUNCTION crm_membership_type_usage FROM PUBLIC;

-- Keyset orders of ListMemberships.
CREATE INDEX memberships_entity_start ON memberships (entity_id, start_date DESC, id DESC);
CREATE INDEX memberships_entity_update ON memberships (entity_id, update_time DESC, id DESC);

-- Existing series, with the corrected rules.
SELECT crm_refresh_membership(o.id) FROM organizations o
 WHERE EXISTS (SELECT 1 FROM memberships m WHERE m.organization_id = o.id);
