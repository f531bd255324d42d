-- Failed sign-in counters and temporary locks, by account + address, by
-- account, and by address (see src/throttle.rs for the policy).
CREATE TABLE login_throttle (
    key text PRIMARY KEY,
    failures integer NOT NULL,
    last_failure_time timestamptz NOT NULL,
    locked_until timestamptz
);
