//! The TOTP second factor: enrolment, confirmation with recovery codes,
//! and the two-step sign-in (password, then a code against a short-lived,
//! single-use challenge with a bounded number of attempts).

use chrono::{DateTime, Duration, Utc};
use diesel::{
    QueryableByName,
    result::Error as DieselError,
    sql_types::{Array, BigInt, Bytea, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::RunQueryDsl;
use socle_db::{DbError, EntityScope};
use socle_errors::{Code, Error};
use socle_proto::socle::identity::v1::{LoginResponse, LoginStatus};
use uuid::Uuid;

use crate::{
    audit::{self, By},
    service::{Identity, bad_credentials, load_user, open_session},
    throttle,
    tokens::{hash_token, new_refresh_token},
    totp,
};

/// How long a challenge (password checked, code awaited) lasts.
const CHALLENGE_MINUTES: i64 = 5;
/// Codes tried against one challenge before it is spent.
const CHALLENGE_ATTEMPTS: i32 = 5;
/// Recovery codes issued at confirmation.
const RECOVERY_CODES: usize = 8;

impl Identity {
    /// Whether `code` is a valid TOTP code (not replayed) or an unused
    /// recovery code of `user`; consumes what it accepts.
    pub(crate) async fn second_factor(&self, user: Uuid, code: &str) -> Result<bool, Error> {
        let code = code.trim().to_owned();
        let identity = self.clone();
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    #[derive(QueryableByName)]
                    struct State {
                        #[diesel(sql_type = Nullable<Text>)]
                        totp_secret: Option<String>,
                        #[diesel(sql_type = Nullable<BigInt>)]
                        totp_last_step: Option<i64>,
                    }
                    let state: State =
                        diesel::sql_query("SELECT totp_secret, totp_last_step FROM users WHERE id = $1 FOR UPDATE")
                            .bind::<SqlUuid, _>(user)
                            .get_result(conn)
                            .await
                            .map_err(DbError::from)?;
                    let Some(sealed) = state.totp_secret else { return Ok(false) };
                    let secret = identity.totp_keys().open(user, &sealed)?;
                    if let Some(step) =
                        totp::verify(&secret, &code, totp::step_of(Utc::now().timestamp()), state.totp_last_step)
                    {
                        diesel::sql_query("UPDATE users SET totp_last_step = $2 WHERE id = $1")
                            .bind::<SqlUuid, _>(user)
                            .bind::<BigInt, _>(step)
                            .execute(conn)
                            .await
                            .map_err(DbError::from)?;
                        return Ok(true);
                    }
                    // A recovery code, used once.
                    let used = diesel::sql_query(
                        "UPDATE users SET totp_recovery_hashes = array_remove(totp_recovery_hashes, $2)
                          WHERE id = $1 AND $2 = ANY (totp_recovery_hashes)",
                    )
                    .bind::<SqlUuid, _>(user)
                    .bind::<Bytea, _>(hash_token(&code.to_uppercase()))
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    Ok(used == 1)
                })
            })
            .await
    }

    /// Opens a challenge after a correct password.
    pub(crate) async fn open_challenge(
        &self,
        user: Uuid,
        user_agent: &str,
        ip: &str,
    ) -> Result<(String, DateTime<Utc>), Error> {
        let token = new_refresh_token();
        let expire = Utc::now() + Duration::minutes(CHALLENGE_MINUTES);
        let (hash, user_agent, ip) = (hash_token(&token), user_agent.to_owned(), ip.to_owned());
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    diesel::sql_query(
                        "INSERT INTO login_challenges (token_hash, user_id, expire_time, user_agent, ip_address) VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind::<Bytea, _>(&hash)
                    .bind::<SqlUuid, _>(user)
                    .bind::<Timestamptz, _>(expire)
                    .bind::<Text, _>(&user_agent)
                    .bind::<Text, _>(&ip)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
        Ok((token, expire))
    }

    /// The second step: a code against a challenge.
    pub(crate) async fn login_with_challenge(&self, challenge: &str, code: &str) -> Result<LoginResponse, Error> {
        let hash = hash_token(challenge);
        let refused = || Error::unauthenticated("the sign-in challenge is invalid or expired: sign in again");
        #[derive(QueryableByName)]
        struct Challenge {
            #[diesel(sql_type = SqlUuid)]
            user_id: Uuid,
            #[diesel(sql_type = Integer)]
            attempts: i32,
            #[diesel(sql_type = Text)]
            user_agent: String,
            #[diesel(sql_type = Text)]
            ip_address: String,
        }
        let lookup = hash.clone();
        let found: Option<Challenge> = self
            .db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    match diesel::sql_query(
                        "UPDATE login_challenges SET attempts = attempts + 1
                          WHERE token_hash = $1 AND expire_time > now() AND attempts < $2
                      RETURNING user_id, attempts, user_agent, ip_address",
                    )
                    .bind::<Bytea, _>(&lookup)
                    .bind::<Integer, _>(CHALLENGE_ATTEMPTS)
                    .get_result(conn)
                    .await
                    {
                        Ok(row) => Ok(Some(row)),
                        Err(DieselError::NotFound) => Ok(None),
                        Err(e) => Err(Error::from(DbError::from(e))),
                    }
                })
            })
            .await?;
        let challenge = found.ok_or_else(refused)?;
        if code.trim().is_empty() {
            return Err(Error::invalid_field("totp_code", "is required with a challenge token"));
        }
        // Codes count toward the same locks as passwords: opening challenge
        // after challenge must not give unlimited guesses.
        let email = crate::service::normalize_email(&self.user_by_id(&challenge.user_id.to_string()).await?.email);
        let keys = std::sync::Arc::new(throttle::Keys::new(&email, &challenge.ip_address));
        let check_keys = keys.clone();
        let locked = self
            .db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move { Ok::<_, Error>(throttle::locked_for(conn, &check_keys).await?) })
            })
            .await?;
        if let Some(wait) = locked {
            return Err(Error::new(Code::ResourceExhausted, "too many failed sign-in attempts: retry later")
                .with_retry_after(wait.max(std::time::Duration::from_secs(1))));
        }
        if !self.second_factor(challenge.user_id, code).await? {
            let failure_keys = keys.clone();
            let user = challenge.user_id;
            self.db()
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let lock = throttle::record_failure(conn, &failure_keys).await?;
                        crate::audit::sign_in_failed(conn, user, "bad_second_factor", lock.as_ref()).await?;
                        Ok::<_, Error>(lock)
                    })
                })
                .await?;
            tracing::info!(outcome = "denied", attempt = challenge.attempts, "login failed: second factor");
            return Err(bad_credentials());
        }
        let identity = self.clone();
        let tokens = self
            .db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let spent = diesel::sql_query("DELETE FROM login_challenges WHERE token_hash = $1")
                        .bind::<Bytea, _>(&hash)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    if spent == 0 {
                        return Err(Error::unauthenticated("the sign-in challenge was already used"));
                    }
                    throttle::record_success(conn, &keys).await?;
                    diesel::sql_query("UPDATE users SET last_login_time = now() WHERE id = $1")
                        .bind::<SqlUuid, _>(challenge.user_id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    let tokens =
                        open_session(conn, &identity, challenge.user_id, &challenge.user_agent, &challenge.ip_address)
                            .await?;
                    crate::audit::signed_in(conn, challenge.user_id, true).await?;
                    Ok::<_, Error>(tokens)
                })
            })
            .await?;
        Ok(LoginResponse { status: LoginStatus::Succeeded as i32, tokens: Some(tokens), ..Default::default() })
    }

    /// Starts an enrolment: a pending secret, valid 10 minutes.
    /// The secret is stored encrypted: without a key, `FAILED_PRECONDITION`.
    pub(crate) async fn enroll_totp(&self, user: Uuid) -> Result<(Vec<u8>, DateTime<Utc>), Error> {
        let secret = totp::new_secret();
        let expire = Utc::now() + Duration::minutes(10);
        let pending = self.totp_keys().seal(user, &secret)?;
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    diesel::sql_query(
                        "UPDATE users SET totp_pending_secret = $2, totp_pending_expire_time = $3 WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(user)
                    .bind::<Text, _>(&pending)
                    .bind::<Timestamptz, _>(expire)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
        Ok((secret, expire))
    }

    /// Confirms an enrolment with a first code; returns the recovery codes.
    pub(crate) async fn confirm_totp(&self, user: Uuid, code: &str) -> Result<Vec<String>, Error> {
        let code = code.trim().to_owned();
        let recovery: Vec<String> = (0..RECOVERY_CODES)
            .map(|_| {
                new_refresh_token()
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .take(10)
                    .collect::<String>()
                    .to_uppercase()
            })
            .collect();
        let hashes: Vec<Vec<u8>> = recovery.iter().map(|c| hash_token(c)).collect();
        let identity = self.clone();
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    #[derive(QueryableByName)]
                    struct Pending {
                        #[diesel(sql_type = Nullable<Text>)]
                        totp_pending_secret: Option<String>,
                        #[diesel(sql_type = Nullable<Timestamptz>)]
                        totp_pending_expire_time: Option<DateTime<Utc>>,
                    }
                    let before = load_user(conn, user).await?;
                    let pending: Pending = diesel::sql_query(
                        "SELECT totp_pending_secret, totp_pending_expire_time FROM users WHERE id = $1 FOR UPDATE",
                    )
                    .bind::<SqlUuid, _>(user)
                    .get_result(conn)
                    .await
                    .map_err(DbError::from)?;
                    let secret = match (pending.totp_pending_secret, pending.totp_pending_expire_time) {
                        (Some(sealed), Some(until)) if until > Utc::now() => identity.totp_keys().open(user, &sealed)?,
                        _ => return Err(Error::new(Code::FailedPrecondition, "no enrolment in progress: start it again")),
                    };
                    let Some(step) = totp::verify(&secret, &code, totp::step_of(Utc::now().timestamp()), None) else {
                        return Err(Error::invalid_field("code", "is not the current code of the authenticator"));
                    };
                    // Sealed again: under the current key if it changed since the enrolment began.
                    let sealed = identity.totp_keys().seal(user, &secret)?;
                    diesel::sql_query(
                        "UPDATE users SET totp_secret = $2, totp_last_step = $3, totp_pending_secret = NULL,
                                totp_pending_expire_time = NULL, totp_recovery_hashes = $4, version = version + 1, update_time = now()
                          WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(user)
                    .bind::<Text, _>(&sealed)
                    .bind::<BigInt, _>(step)
                    .bind::<Array<Bytea>, _>(&hashes)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    // `totp_enabled` only: never the secret nor the codes.
                    let after = load_user(conn, user).await?;
                    audit::user_changed(conn, "identity.second_factor.enable", By::Caller, Some(&before), Some(&after), &[])
                        .await
                })
            })
            .await?;
        Ok(recovery)
    }

    /// Turns the second factor off.
    pub(crate) async fn disable_totp(&self, user: Uuid) -> Result<(), Error> {
        self.db()
            .transaction(&EntityScope::System, move |conn| {
                Box::pin(async move {
                    let before = load_user(conn, user).await?;
                    diesel::sql_query(
                        "UPDATE users SET totp_secret = NULL, totp_last_step = NULL, totp_recovery_hashes = '{}',
                                version = version + 1, update_time = now() WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(user)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    let after = load_user(conn, user).await?;
                    audit::user_changed(
                        conn,
                        "identity.second_factor.disable",
                        By::Caller,
                        Some(&before),
                        Some(&after),
                        &[],
                    )
                    .await
                })
            })
            .await
    }
}
