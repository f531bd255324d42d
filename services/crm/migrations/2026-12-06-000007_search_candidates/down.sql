DROP FUNCTION crm_contact_search_candidates(uuid[], text, text, text, text);
DROP FUNCTION crm_organization_search_candidates(uuid[], text, text, text, text, text);
