-- Roles: named sets of permissions. Built-in roles (entity_id NULL) are
-- written by the service at start-up from its code; custom roles belong to
-- an entity and can be granted on it and its descendants.
CREATE TABLE roles (
    id uuid PRIMARY KEY,
    entity_id uuid REFERENCES entities (id),
    name text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_]{1,62}$'),
    display_name text NOT NULL CHECK (length(btrim(display_name)) BETWEEN 1 AND 120),
    description text NOT NULL DEFAULT '',
    permissions text[] NOT NULL CHECK (cardinality(permissions) > 0),
    built_in boolean NOT NULL DEFAULT false,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    version bigint NOT NULL DEFAULT 1,
    CHECK (built_in = (entity_id IS NULL))
);
CREATE UNIQUE INDEX roles_builtin_name ON roles (name) WHERE entity_id IS NULL;
CREATE UNIQUE INDEX roles_custom_name ON roles (entity_id, name) WHERE entity_id IS NOT NULL;

-- Grants: a role given to a principal on an entity, alone or with its subtree.
CREATE TABLE grants (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL REFERENCES entities (id),
    principal_kind smallint NOT NULL CHECK (principal_kind IN (1, 2)),
    principal_id uuid NOT NULL,
    role_id uuid NOT NULL REFERENCES roles (id),
    scope smallint NOT NULL CHECK (scope IN (1, 2)),
    expire_time timestamptz,
    reason text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX grants_principal ON grants (principal_kind, principal_id);
CREATE INDEX grants_entity ON grants (entity_id);
CREATE INDEX grants_role ON grants (role_id);

-- A counter bumped by every change of the tree, roles or grants, so that
-- callers caching access decisions can drop stale ones.
CREATE TABLE policy_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version bigint NOT NULL
);
INSERT INTO policy_version (version) VALUES (1);
