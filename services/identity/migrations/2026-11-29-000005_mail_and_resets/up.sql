-- Outgoing e-mail, written in the transaction of what it announces (an
-- invitation, a password reset) and delivered afterwards by the configured
-- transport. The body holds a single-use link: it is erased once delivered.
-- A person's mails go with their account.
CREATE TABLE outgoing_mail (
    id uuid PRIMARY KEY,
    user_id uuid REFERENCES users (id) ON DELETE CASCADE,
    recipient text NOT NULL,
    subject text NOT NULL,
    body text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    send_time timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    last_error text
);
CREATE INDEX outgoing_mail_pending ON outgoing_mail (create_time) WHERE send_time IS NULL;

-- Password reset tokens: 256 random bits, stored as SHA-256, short-lived and
-- single-use (`use_time`).
CREATE TABLE password_resets (
    token_hash bytea PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    create_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz NOT NULL,
    use_time timestamptz
);
CREATE INDEX password_resets_user ON password_resets (user_id);

-- Listing accounts: by home entity, in the orders of ListUsers.
CREATE INDEX users_entity ON users (entity_id);
