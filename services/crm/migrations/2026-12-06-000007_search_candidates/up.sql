-- Search candidates, one index scan per way of matching.
--
-- Under row-level security PostgreSQL never evaluates a qualifier whose
-- operator is not LEAKPROOF before the policy's: pg_trgm's `%` and `<%`,
-- full text's `@@` and the arrays' `@>` are not, so none of their indexes
-- could serve the application role, and every search read both tables
-- whole: 1.6 s for 100,000 organisations and 300,000 contacts
-- (`cargo xtask bench crm`'s data), 8 to 50 ms with this function.
--
-- It runs as the owner (SECURITY DEFINER, so that the indexes serve),
-- applies the caller's scope itself with the policy's own rule
-- (`socle_entity_visible`, from the transaction's `socle.entity_scope`)
-- and the entities asked for per kind (none: nothing is read), and returns
-- ids only. The service's ranking query then reads the rows under
-- row-level security as usual: a candidate outside the scope could not be
-- read even if it were returned.
--
-- Typos are a fallback: trigram matches are looked for only when the words
-- themselves (full text, prefixes) and the identifiers match fewer than 20
-- records in scope, organisations and contacts together. Otherwise
-- "boulangerie martin" would bring every bakery (the trade word alone is
-- similar enough) and rank thousands of rows for nothing. Trigram matches
-- count from 0.45 (a typo scores 0.7 and more): weaker ones are noise.
CREATE FUNCTION crm_search_candidates(
    p_org_entities uuid[], p_contact_entities uuid[], p_tsquery text, p_folded text, p_digits text,
    p_phone text, p_email text
) RETURNS TABLE (kind smallint, id uuid)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = public, pg_temp SET pg_trgm.similarity_threshold = 0.45 AS $$
BEGIN
    -- Planned for these values on every call (EXECUTE): a generic plan
    -- cannot skip the unused ways of matching and joins whole entities.
    RETURN QUERY EXECUTE $q$
    WITH exact_orgs AS (
        SELECT x.id FROM organizations x WHERE $5 <> '' AND (x.siren = $5 OR x.siret = $5)
           AND x.entity_id = ANY ($1) AND socle_entity_visible(x.entity_id)
        UNION SELECT x.id FROM organizations x WHERE $6 <> '' AND x.phone = $6
           AND x.entity_id = ANY ($1) AND socle_entity_visible(x.entity_id)
        UNION SELECT x.id FROM organizations x WHERE $7 <> '' AND x.email_key = $7
           AND x.entity_id = ANY ($1) AND socle_entity_visible(x.entity_id)
        UNION SELECT x.id FROM organizations x WHERE $3 <> '' AND x.search_vector @@ to_tsquery('french', $3)
           AND x.entity_id = ANY ($1) AND socle_entity_visible(x.entity_id)
    ), exact_contacts AS (
        SELECT x.id FROM contacts x WHERE $6 <> '' AND x.phone_keys @> ARRAY[$6]
           AND x.entity_id = ANY ($2) AND socle_entity_visible(x.entity_id)
        UNION SELECT x.id FROM contacts x WHERE $7 <> '' AND x.email_keys @> ARRAY[$7]
           AND x.entity_id = ANY ($2) AND socle_entity_visible(x.entity_id)
        UNION SELECT x.id FROM contacts x WHERE $3 <> '' AND x.search_vector @@ to_tsquery('simple', $3)
           AND x.entity_id = ANY ($2) AND socle_entity_visible(x.entity_id)
    ), exact_count AS (
        SELECT (SELECT count(*) FROM exact_orgs) + (SELECT count(*) FROM exact_contacts) AS n
    ), fuzzy_orgs AS (
        SELECT x.id FROM organizations x WHERE x.name_key % $4
           AND x.entity_id = ANY ($1) AND socle_entity_visible(x.entity_id)
        UNION SELECT x.id FROM organizations x WHERE x.trade_key % $4
           AND x.entity_id = ANY ($1) AND socle_entity_visible(x.entity_id)
        UNION SELECT x.id FROM organizations x WHERE $4 <% x.name_key
           AND x.entity_id = ANY ($1) AND socle_entity_visible(x.entity_id)
    ), fuzzy_contacts AS (
        SELECT x.id FROM contacts x WHERE x.name_key % $4
           AND x.entity_id = ANY ($2) AND socle_entity_visible(x.entity_id)
        UNION SELECT x.id FROM contacts x WHERE $4 <% x.name_key
           AND x.entity_id = ANY ($2) AND socle_entity_visible(x.entity_id)
        UNION SELECT x.id FROM contacts x WHERE crm_join(x.email_keys) % $4
           AND x.entity_id = ANY ($2) AND socle_entity_visible(x.entity_id)
    )
    SELECT 1::smallint, e.id FROM exact_orgs e WHERE cardinality($1) > 0
    UNION SELECT 1::smallint, f.id FROM fuzzy_orgs f
     WHERE cardinality($1) > 0 AND (SELECT n FROM exact_count) < 20
    UNION ALL
    (SELECT 2::smallint, e.id FROM exact_contacts e WHERE cardinality($2) > 0
     UNION SELECT 2::smallint, f.id FROM fuzzy_contacts f
      WHERE cardinality($2) > 0 AND (SELECT n FROM exact_count) < 20)$q$
    USING p_org_entities, p_contact_entities, p_tsquery, p_folded, p_digits, p_phone, p_email;
END
$$;
