-- People who sign in. The e-mail is unique after normalisation (trimmed,
-- lower case); no password exists until the invitation is accepted.
CREATE TABLE users (
    id uuid PRIMARY KEY,
    entity_id uuid NOT NULL,
    email text NOT NULL,
    email_normalized text NOT NULL,
    given_name text NOT NULL DEFAULT '',
    family_name text NOT NULL DEFAULT '',
    display_name text NOT NULL,
    locale text NOT NULL DEFAULT 'fr-FR',
    default_entity_id uuid,
    state smallint NOT NULL CHECK (state IN (1, 2, 3)),
    password_hash text,
    password_update_time timestamptz,
    last_login_time timestamptz,
    invitation_hash bytea,
    invitation_expire_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    version bigint NOT NULL DEFAULT 1,
    CONSTRAINT users_email_key UNIQUE (email_normalized),
    CHECK (state <> 2 OR password_hash IS NOT NULL)
);
CREATE UNIQUE INDEX users_invitation ON users (invitation_hash) WHERE invitation_hash IS NOT NULL;

-- A session is a family of refresh tokens: each refresh spends the
-- presented token and issues the next; presenting a spent token again
-- revokes the whole session (the token was stolen or replayed).
CREATE TABLE sessions (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    create_time timestamptz NOT NULL DEFAULT now(),
    last_refresh_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz NOT NULL,
    user_agent text NOT NULL DEFAULT '',
    ip_address text NOT NULL DEFAULT '',
    revoke_time timestamptz,
    revoke_reason text
);
CREATE INDEX sessions_user ON sessions (user_id);

-- Refresh tokens are stored hashed (SHA-256): the database never holds one
-- that could be used.
CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    issue_time timestamptz NOT NULL DEFAULT now(),
    spend_time timestamptz
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);
