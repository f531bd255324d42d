-- Encrypted secrets cannot be decrypted in SQL: going back is only possible
-- while none exists (reset those second factors first).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM users WHERE totp_secret LIKE 'v1:%' OR totp_pending_secret LIKE 'v1:%') THEN
        RAISE EXCEPTION 'encrypted TOTP secrets exist: reset those second factors before reverting';
    END IF;
END $$;
ALTER TABLE users
    DROP CONSTRAINT users_totp_secret_format,
    DROP CONSTRAINT users_totp_pending_secret_format;
ALTER TABLE users
    ALTER COLUMN totp_secret TYPE bytea USING decode(substr(totp_secret, 7), 'hex'),
    ALTER COLUMN totp_pending_secret TYPE bytea USING decode(substr(totp_pending_secret, 7), 'hex');
