-- Optional TOTP second factor (RFC 6238). The pending secret waits for a
-- first valid code; recovery codes are stored as SHA-256 and used once.
ALTER TABLE users
    ADD COLUMN totp_secret bytea,
    ADD COLUMN totp_pending_secret bytea,
    ADD COLUMN totp_pending_expire_time timestamptz,
    ADD COLUMN totp_last_step bigint,
    ADD COLUMN totp_recovery_hashes bytea[] NOT NULL DEFAULT '{}';

-- A password checked, a second factor awaited: short-lived, single-use,
-- stored hashed, with a bounded number of code attempts.
CREATE TABLE login_challenges (
    token_hash bytea PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expire_time timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    user_agent text NOT NULL DEFAULT '',
    ip_address text NOT NULL DEFAULT ''
);
