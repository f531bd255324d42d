DROP INDEX IF EXISTS affiliations_organization_current;
DROP INDEX IF EXISTS interactions_author;
DROP INDEX IF EXISTS interactions_tags;
DROP INDEX IF EXISTS interactions_search;
ALTER TABLE interactions DROP COLUMN IF EXISTS search_vector;
ALTER TABLE interaction_contacts DROP COLUMN IF EXISTS ordinal;
