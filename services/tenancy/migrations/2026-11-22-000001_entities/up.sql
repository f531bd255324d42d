-- The entity tree: national root, regions, branches, any depth.
CREATE TABLE entities (
    id uuid PRIMARY KEY,
    parent_id uuid REFERENCES entities (id),
    kind smallint NOT NULL CHECK (kind BETWEEN 1 AND 3),
    display_name text NOT NULL CHECK (length(btrim(display_name)) BETWEEN 1 AND 120),
    legal_name text NOT NULL DEFAULT '',
    code text NOT NULL CHECK (code ~ '^[A-Z0-9][A-Z0-9-]{0,31}$'),
    slug text NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    siret text NOT NULL DEFAULT '' CHECK (siret = '' OR siret ~ '^[0-9]{14}$'),
    address jsonb NOT NULL DEFAULT '{}',
    email text NOT NULL DEFAULT '',
    phone text NOT NULL DEFAULT '',
    website text NOT NULL DEFAULT '',
    state smallint NOT NULL DEFAULT 1 CHECK (state IN (1, 2)),
    archive_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    version bigint NOT NULL DEFAULT 1,
    CONSTRAINT entities_code_key UNIQUE (code),
    CONSTRAINT entities_slug_key UNIQUE (slug),
    CONSTRAINT entities_archive_time_matches_state CHECK ((state = 2) = (archive_time IS NOT NULL))
);
-- One root only.
CREATE UNIQUE INDEX entities_single_root ON entities ((parent_id IS NULL)) WHERE parent_id IS NULL;
CREATE INDEX entities_parent ON entities (parent_id);

-- Closure table: one row per (ancestor, descendant) pair, the entity itself
-- included at depth 0. Subtree and ancestor queries are index lookups.
CREATE TABLE entity_closure (
    ancestor_id uuid NOT NULL REFERENCES entities (id),
    descendant_id uuid NOT NULL REFERENCES entities (id),
    depth integer NOT NULL CHECK (depth >= 0),
    PRIMARY KEY (ancestor_id, descendant_id)
);
CREATE INDEX entity_closure_descendant ON entity_closure (descendant_id, depth);
