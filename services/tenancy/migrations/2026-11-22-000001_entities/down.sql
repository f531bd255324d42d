DROP TABLE entity_closure;
DROP TABLE entities;
