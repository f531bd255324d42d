//! Outgoing e-mail: invitations and password resets.
//!
//! A mail is a row of `outgoing_mail`, written by [`enqueue`] in the same
//! transaction as what it announces (so a committed reset token always has
//! its mail, and a rolled-back one never does). The configured transport
//! delivers pending rows afterwards ([`Mailer::deliver_pending`], called
//! after each write and every 30 s), marks them sent and erases their body,
//! which holds a single-use link. Delivery is at least once: a crash between
//! writing the message and committing sends it again.
//!
//! Transports (`auth.mail_transport`): `none` keeps mails queued and makes
//! e-mail invitations answer `UNIMPLEMENTED`; `directory` writes one
//! RFC 5322 `.eml` file per mail into `auth.mail_directory` (development
//! and tests). No SMTP transport is built yet.

use std::path::PathBuf;

use base64::{Engine, engine::general_purpose::STANDARD};
use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_db::{Database, DbError, EntityScope};
use socle_errors::Error;
use socle_server::AuthSettings;
use uuid::Uuid;

/// How mails leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Kept queued.
    None,
    /// `.eml` files in a folder.
    Directory(PathBuf),
}

/// The configured transport and sender.
#[derive(Debug, Clone)]
pub struct Mailer {
    transport: Transport,
    from: String,
}

impl Mailer {
    /// The mailer of `[auth]`; an unknown transport or a `directory`
    /// transport without a folder is a configuration error.
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, String> {
        let transport = match settings.mail_transport.trim() {
            "" | "none" => Transport::None,
            "directory" => {
                let dir = settings
                    .mail_directory
                    .as_deref()
                    .filter(|d| !d.trim().is_empty())
                    .ok_or("auth.mail_transport = \"directory\" needs auth.mail_directory")?;
                std::fs::create_dir_all(dir).map_err(|e| format!("auth.mail_directory `{dir}`: {e}"))?;
                Transport::Directory(PathBuf::from(dir))
            }
            other => {
                return Err(format!(
                    "auth.mail_transport `{other}` is unknown: `none` or `directory` (no SMTP transport yet)"
                ));
            }
        };
        if settings.mail_from.contains(['\r', '\n']) {
            return Err("auth.mail_from must be one line".into());
        }
        Ok(Mailer { transport, from: settings.mail_from.clone() })
    }

    /// Whether mails actually leave.
    pub fn delivers(&self) -> bool {
        self.transport != Transport::None
    }

    /// Delivers the pending mails (at most 100 per call); returns how many
    /// left. A failed delivery stays pending with its error.
    pub async fn deliver_pending(&self, db: &Database) -> Result<usize, Error> {
        let Transport::Directory(dir) = &self.transport else { return Ok(0) };
        let (dir, from) = (dir.clone(), self.from.clone());
        db.transaction(&EntityScope::System, move |conn| {
            Box::pin(async move {
                #[derive(QueryableByName)]
                struct Pending {
                    #[diesel(sql_type = SqlUuid)]
                    id: Uuid,
                    #[diesel(sql_type = Text)]
                    recipient: String,
                    #[diesel(sql_type = Text)]
                    subject: String,
                    #[diesel(sql_type = Text)]
                    body: String,
                    #[diesel(sql_type = Timestamptz)]
                    create_time: DateTime<Utc>,
                }
                let pending: Vec<Pending> = diesel::sql_query(
                    "SELECT id, recipient, subject, body, create_time FROM outgoing_mail
                      WHERE send_time IS NULL ORDER BY create_time LIMIT 100 FOR UPDATE SKIP LOCKED",
                )
                .load(conn)
                .await
                .map_err(DbError::from)?;
                let mut sent = 0;
                for mail in pending {
                    let message = render(&from, &mail.recipient, &mail.subject, &mail.body, mail.id, mail.create_time);
                    let written = write_file(&dir, mail.id, mail.create_time, message).await;
                    let error = written.err().map(|e| e.to_string());
                    if error.is_none() {
                        sent += 1;
                    } else {
                        tracing::warn!(mail = %mail.id, error = ?error, "mail delivery failed");
                    }
                    diesel::sql_query(
                        "UPDATE outgoing_mail SET attempts = attempts + 1, last_error = $2,
                                send_time = CASE WHEN $2 IS NULL THEN now() END,
                                body = CASE WHEN $2 IS NULL THEN '' ELSE body END
                          WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(mail.id)
                    .bind::<Nullable<Text>, _>(error)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                }
                Ok(sent)
            })
        })
        .await
    }

    /// Delivers now, logging (not returning) a failure: the mail stays
    /// queued and the next delivery retries it.
    pub async fn flush(&self, db: &Database) {
        if let Err(e) = self.deliver_pending(db).await {
            tracing::warn!(error = %e, "mail delivery failed; the mails stay queued");
        }
    }
}

/// Queues a mail to `recipient` in the caller's transaction.
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    user: Option<Uuid>,
    recipient: &str,
    subject: &str,
    body: &str,
) -> Result<(), DbError> {
    diesel::sql_query("INSERT INTO outgoing_mail (id, user_id, recipient, subject, body) VALUES ($1, $2, $3, $4, $5)")
        .bind::<SqlUuid, _>(Uuid::now_v7())
        .bind::<Nullable<SqlUuid>, _>(user)
        .bind::<Text, _>(recipient)
        .bind::<Text, _>(subject)
        .bind::<Text, _>(body)
        .execute(conn)
        .await?;
    Ok(())
}

async fn write_file(dir: &std::path::Path, id: Uuid, time: DateTime<Utc>, message: String) -> std::io::Result<()> {
    let name = format!("{}-{id}.eml", time.format("%Y%m%d%H%M%S"));
    let temporary = dir.join(format!(".{id}.tmp"));
    tokio::fs::write(&temporary, message).await?;
    // The rename makes the file appear whole to whoever watches the folder.
    tokio::fs::rename(&temporary, dir.join(name)).await
}

/// A header value: as is when ASCII, else an RFC 2047 encoded word.
fn header_text(value: &str) -> String {
    if value.is_ascii() { value.to_owned() } else { format!("=?UTF-8?B?{}?=", STANDARD.encode(value)) }
}

/// An RFC 5322 message: plain UTF-8 text, CRLF line ends.
pub fn render(from: &str, to: &str, subject: &str, body: &str, id: Uuid, date: DateTime<Utc>) -> String {
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    let mut message = format!(
        "From: {}\r\nTo: {}\r\nSubject: {}\r\nDate: {}\r\nMessage-ID: <{id}@socle>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        clean(from),
        clean(to),
        header_text(&clean(subject)),
        date.to_rfc2822(),
    );
    for line in body.lines() {
        message.push_str(line);
        message.push_str("\r\n");
    }
    message
}

/// The invitation e-mail (French).
pub fn invitation(display_name: &str, url: &str, expire: DateTime<Utc>) -> (String, String) {
    (
        "Invitation à rejoindre Socle".to_owned(),
        format!(
            "Bonjour {display_name},\n\n\
             Un compte Socle a été créé pour vous. Pour l'activer, choisissez votre mot de passe\n\
             en ouvrant ce lien, valable jusqu'au {} (UTC) :\n\n{url}\n\n\
             Si vous n'attendiez pas cette invitation, ignorez ce message.\n",
            expire.format("%d/%m/%Y à %H:%M"),
        ),
    )
}

/// The password reset e-mail (French).
pub fn password_reset(display_name: &str, url: &str, minutes: u64) -> (String, String) {
    (
        "Réinitialisation de votre mot de passe Socle".to_owned(),
        format!(
            "Bonjour {display_name},\n\n\
             Une réinitialisation du mot de passe de votre compte Socle a été demandée.\n\
             Pour choisir un nouveau mot de passe, ouvrez ce lien (valable {minutes} minutes, une seule fois) :\n\n\
             {url}\n\n\
             Si vous n'êtes pas à l'origine de cette demande, ignorez ce message : votre mot de passe\n\
             reste inchangé. Toutes vos sessions seront fermées une fois le nouveau mot de passe choisi.\n",
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_rfc_5322_with_encoded_subjects() {
        let date = DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().with_timezone(&Utc);
        let id = Uuid::nil();
        let m = render("Socle <a@b.fr>", "c@d.fr", "Réinitialisation", "ligne 1\nligne 2", id, date);
        assert!(m.starts_with("From: Socle <a@b.fr>\r\nTo: c@d.fr\r\nSubject: =?UTF-8?B?"), "{m}");
        assert!(m.contains("\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"), "{m}");
        assert!(m.ends_with("\r\n\r\nligne 1\r\nligne 2\r\n"), "{m}");
        let encoded = m.lines().find(|l| l.starts_with("Subject:")).unwrap();
        let b64 = encoded.trim_start_matches("Subject: =?UTF-8?B?").trim_end_matches("?=");
        assert_eq!(String::from_utf8(STANDARD.decode(b64).unwrap()).unwrap(), "Réinitialisation");
        let injected = render("a@b.fr", "c@d.fr\r\nBcc: x@y.fr", "s", "b", id, date);
        assert!(!injected.contains("\r\nBcc:"), "no header injection");
    }
}
