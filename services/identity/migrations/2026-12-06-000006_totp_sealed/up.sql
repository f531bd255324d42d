-- TOTP secrets are encrypted at rest (AES-256-GCM, src/totp_keys.rs) as
-- text: `v1:<key id>:<base64 of nonce, ciphertext and tag>`. The key is not
-- in the database, so existing secrets cannot be encrypted here: they become
-- `clear:<hex>` and identity encrypts them at its next start-up, in one
-- transaction. Instances still running the previous version read these
-- values as wrong secrets and refuse codes until they are replaced.
ALTER TABLE users
    ALTER COLUMN totp_secret TYPE text
        USING CASE WHEN totp_secret IS NULL THEN NULL ELSE 'clear:' || encode(totp_secret, 'hex') END,
    ALTER COLUMN totp_pending_secret TYPE text
        USING CASE WHEN totp_pending_secret IS NULL THEN NULL ELSE 'clear:' || encode(totp_pending_secret, 'hex') END;
ALTER TABLE users
    ADD CONSTRAINT users_totp_secret_format CHECK (totp_secret ~ '^(v1|clear):'),
    ADD CONSTRAINT users_totp_pending_secret_format CHECK (totp_pending_secret ~ '^(v1|clear):');
