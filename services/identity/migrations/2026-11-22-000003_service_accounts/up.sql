-- Service accounts: non-human principals using client credentials. Their
-- secrets are 256-bit random strings, stored as SHA-256 (their entropy makes
-- a slow hash unnecessary). A rotation keeps the previous secret valid for
-- a grace period.
CREATE TABLE service_accounts (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    name text NOT NULL CHECK (name ~ '^[a-z][a-z0-9-]{1,62}$'),
    display_name text NOT NULL CHECK (length(btrim(display_name)) BETWEEN 1 AND 120),
    description text NOT NULL DEFAULT '',
    client_id text NOT NULL,
    secret_hash bytea NOT NULL,
    secret_create_time timestamptz NOT NULL DEFAULT now(),
    previous_secret_hash bytea,
    previous_secret_expire_time timestamptz,
    disabled boolean NOT NULL DEFAULT false,
    last_token_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    version bigint NOT NULL DEFAULT 1,
    CONSTRAINT service_accounts_client_id_key UNIQUE (client_id),
    CONSTRAINT service_accounts_name_key UNIQUE (entity_id, name)
);
