-- Search candidates, one index scan per way of matching.
--
-- Under row-level security PostgreSQL never evaluates a qualifier whose
-- operator is not LEAKPROOF before the policy's: pg_trgm's `%` and `<%`,
-- full text's `@@` and the arrays' `@>` are not, so none of their indexes
-- could serve the application role, and every search read both tables
-- whole: 1.6 s for 100,000 organisations and 300,000 contacts, against
-- 0.15 s with the indexes (`cargo xtask bench crm`'s data, this machine).
--
-- These functions run as the owner (SECURITY DEFINER, so the indexes
-- serve), apply the caller's scope themselves with the policy's own rule
-- (`socle_entity_visible`, from the transaction's `socle.entity_scope`) and
-- the entities asked for (none: nothing is read), and return ids only.
-- The service's ranking query then reads the rows under row-level
-- security as usual: a candidate outside the scope could not be read even
-- if it were returned.
-- Trigram matches count from 0.45 (a typo scores 0.7 and more): weaker ones
-- are noise, and costly to rank.
CREATE FUNCTION crm_organization_search_candidates(
    p_entities uuid[], p_tsquery text, p_folded text, p_digits text, p_phone text, p_email text
) RETURNS TABLE (id uuid)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp SET pg_trgm.similarity_threshold = 0.45 AS $$
    SELECT o.id
      FROM (SELECT x.id FROM organizations x WHERE p_digits <> '' AND (x.siren = p_digits OR x.siret = p_digits)
            UNION SELECT x.id FROM organizations x WHERE p_phone <> '' AND x.phone = p_phone
            UNION SELECT x.id FROM organizations x WHERE p_email <> '' AND x.email_key = p_email
            UNION SELECT x.id FROM organizations x
                   WHERE p_tsquery <> '' AND x.search_vector @@ to_tsquery('french', p_tsquery)
            UNION SELECT x.id FROM organizations x WHERE x.name_key % p_folded
            UNION SELECT x.id FROM organizations x WHERE x.trade_key % p_folded
            UNION SELECT x.id FROM organizations x WHERE p_folded <% x.name_key) c
      JOIN organizations o ON o.id = c.id
     WHERE cardinality(p_entities) > 0 AND o.entity_id = ANY (p_entities) AND socle_entity_visible(o.entity_id)
$$;

CREATE FUNCTION crm_contact_search_candidates(
    p_entities uuid[], p_tsquery text, p_folded text, p_phone text, p_email text
) RETURNS TABLE (id uuid)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp SET pg_trgm.similarity_threshold = 0.45 AS $$
    SELECT p.id
      FROM (SELECT x.id FROM contacts x WHERE p_phone <> '' AND x.phone_keys @> ARRAY[p_phone]
            UNION SELECT x.id FROM contacts x WHERE p_email <> '' AND x.email_keys @> ARRAY[p_email]
            UNION SELECT x.id FROM contacts x
                   WHERE p_tsquery <> '' AND x.search_vector @@ to_tsquery('simple', p_tsquery)
            UNION SELECT x.id FROM contacts x WHERE x.name_key % p_folded
            UNION SELECT x.id FROM contacts x WHERE p_folded <% x.name_key
            UNION SELECT x.id FROM contacts x WHERE crm_join(x.email_keys) % p_folded) c
      JOIN contacts p ON p.id = c.id
     WHERE cardinality(p_entities) > 0 AND p.entity_id = ANY (p_entities) AND socle_entity_visible(p.entity_id)
$$;
