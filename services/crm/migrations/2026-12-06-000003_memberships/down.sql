DROP INDEX IF EXISTS memberships_entity_update;
DROP INDEX IF EXISTS memberships_entity_start;
DROP FUNCTION IF EXISTS crm_membership_type_usage;
DROP FUNCTION IF EXISTS crm_membership_period_status;
DROP POLICY IF EXISTS membership_types_offered ON membership_types;
DROP FUNCTION IF EXISTS crm_ancestors;

-- The core's definitions.
CREATE OR REPLACE FUNCTION crm_membership_status(
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

CREATE OR REPLACE FUNCTION crm_refresh_membership(organization uuid) RETURNS void LANGUAGE sql AS $$
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
