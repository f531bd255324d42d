DROP TABLE login_challenges;
ALTER TABLE users DROP COLUMN totp_secret, DROP COLUMN totp_pending_secret, DROP COLUMN totp_pending_expire_time,
    DROP COLUMN totp_last_step, DROP COLUMN totp_recovery_hashes;
