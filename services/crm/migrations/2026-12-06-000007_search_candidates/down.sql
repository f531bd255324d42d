DROP FUNCTION crm_search_candidates(uuid[], uuid[], text, text, text, text, text);
