//! The whole platform with real authorization (`[auth] mode = "tokens"`):
//! every service verifies access tokens with identity's JWKS and asks
//! tenancy for decisions with its own service account. Bootstrapped like a
//! real deployment: the national root, one service account per service
//! (granted `platform_service`; identity's `identity_service`, which also
//! deletes grants), and a first national administrator who accepts an
//! invitation — no default password anywhere.

use std::collections::BTreeMap;

use anyhow::Context;
use serde_json::{Value, json};
use socle_config::SecretString;
use socle_proto::socle::tenancy::v1::GrantScope;
use socle_server::AuthMode;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::{RunningEdge, RunningService, Service, spawn_edge, spawn_service_on};

/// The secured platform.
pub struct SecurePlatform {
    /// The services.
    pub services: BTreeMap<Service, RunningService>,
    /// The edge.
    pub edge: RunningEdge,
    /// The national root entity.
    pub root: String,
    /// A national administrator's access token.
    pub admin_token: String,
    /// Where identity writes its e-mails (`directory` mail transport).
    pub mail_dir: std::path::PathBuf,
    _mail: tempfile::TempDir,
    http: reqwest::Client,
}

async fn database_of(service: &RunningService) -> anyhow::Result<socle_db::Database> {
    Ok(socle_db::Database::connect(
        &SecretString::from(service.database.app_url_with_password()),
        2,
        std::time::Duration::from_secs(5),
    )
    .await?)
}

/// The password every test user gets (tests only).
pub const TEST_PASSWORD: &str = "cheval agrafe batterie correcte";

impl SecurePlatform {
    /// Starts and bootstraps everything.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[], |_| {}).await
    }

    /// Like [`SecurePlatform::start`], with extra entries in identity's
    /// secrets file and its configuration adjusted by `adjust_identity`.
    pub async fn start_with(
        identity_secrets: &[(&str, String)],
        adjust_identity: impl Fn(&mut socle_server::ServiceConfig),
    ) -> anyhow::Result<Self> {
        let mut listeners = BTreeMap::new();
        for service in Service::ALL {
            listeners.insert(service, TcpListener::bind("127.0.0.1:0").await?);
        }
        let url = |s: Service, l: &BTreeMap<Service, TcpListener>| -> anyhow::Result<String> {
            Ok(format!("http://{}", l[&s].local_addr()?))
        };
        let identity_url = url(Service::Identity, &listeners)?;
        let tenancy_url = url(Service::Tenancy, &listeners)?;
        let audit_url = url(Service::Audit, &listeners)?;
        let mail = tempfile::tempdir()?;
        let mail_dir = mail.path().to_path_buf();
        let mut credentials = BTreeMap::new();
        let mut services = BTreeMap::new();
        for (service, listener) in listeners {
            let client_id = format!("sa-{}", service.name());
            let secret = Uuid::new_v4().simple().to_string() + &Uuid::new_v4().simple().to_string();
            credentials.insert(service, (client_id.clone(), secret.clone()));
            let (identity_url, tenancy_url, audit_url) = (identity_url.clone(), tenancy_url.clone(), audit_url.clone());
            let mail_dir = mail_dir.clone();
            let mut secrets = vec![("client_secret", secret)];
            if service == Service::Identity {
                secrets.extend(identity_secrets.iter().cloned());
            }
            let adjust_identity = &adjust_identity;
            let running = spawn_service_on(service, listener, &secrets, move |c| {
                if service == Service::Identity {
                    c.auth.mail_transport = "directory".into();
                    c.auth.mail_directory = Some(mail_dir.display().to_string());
                    c.auth.console_url = "https://console.socle.test".into();
                }
                c.auth.mode = AuthMode::Tokens;
                c.auth.identity_url = Some(identity_url);
                c.auth.tenancy_url = Some(tenancy_url);
                c.auth.client_id = Some(client_id);
                c.auth.client_secret = Some(socle_config::SecretRef::parse("file:client_secret").expect("locator"));
                c.audit.url = Some(audit_url);
                c.audit.poll_interval_ms = 200;
                c.audit.min_backoff_ms = 50;
                c.audit.max_backoff_ms = 1000;
                if service == Service::Identity {
                    adjust_identity(c);
                }
            })
            .await?;
            services.insert(service, running);
        }

        let tenancy = database_of(&services[&Service::Tenancy]).await?;
        let identity = database_of(&services[&Service::Identity]).await?;
        let root = socle_tenancy::ensure_root(&tenancy, "Fédération nationale", "NATIONAL", "national")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let root_id = Uuid::parse_str(&root.id)?;
        for (service, (client_id, secret)) in &credentials {
            let account = socle_identity::bootstrap::ensure_service_account(
                &identity,
                &format!("{}-service", service.name()),
                root_id,
                client_id,
                &SecretString::from(secret.clone()),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            // Identity also removes the grants of the accounts it deletes.
            let role = if *service == Service::Identity { "identity_service" } else { "platform_service" };
            socle_tenancy::bootstrap_grant(&tenancy, 2, account, role, root_id, GrantScope::Subtree)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }

        let mut config = socle_edge::EdgeConfig::default();
        for (service, running) in &services {
            config.upstreams.insert(service.package().to_owned(), running.url());
        }
        let edge = spawn_edge(&socle_edge::default_pool(), config).await?;
        let mut platform = SecurePlatform {
            services,
            edge,
            root: root.id.clone(),
            admin_token: String::new(),
            mail_dir,
            _mail: mail,
            http: reqwest::Client::new(),
        };
        let (admin, token) = platform.user_with_password("admin@socle.test", &root.id).await?;
        socle_tenancy::bootstrap_grant(&tenancy, 1, admin, "national_admin", root_id, GrantScope::Subtree)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        platform.admin_token = token;
        Ok(platform)
    }

    /// Invites a user (bootstrap path) and accepts the invitation through
    /// the edge; returns the user id and an access token.
    pub async fn user_with_password(&self, email: &str, entity: &str) -> anyhow::Result<(Uuid, String)> {
        let identity = database_of(&self.services[&Service::Identity]).await?;
        let (id, invitation) =
            socle_identity::bootstrap::invite_user(&identity, email, email, Uuid::parse_str(entity)?)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        let invitation = invitation.context("the user already exists")?;
        let (status, reply) = self
            .call(
                None,
                reqwest::Method::POST,
                "/api/v1/auth:acceptInvitation",
                None,
                Some(json!({ "invitationToken": invitation, "password": TEST_PASSWORD })),
            )
            .await?;
        anyhow::ensure!(status == 200, "accepting the invitation: {reply}");
        Ok((id, reply["tokens"]["accessToken"].as_str().context("no access token")?.to_owned()))
    }

    /// The e-mails identity sent to `recipient` (RFC 5322 text), oldest first.
    pub fn mails_to(&self, recipient: &str) -> Vec<String> {
        let mut files: Vec<_> = std::fs::read_dir(&self.mail_dir)
            .map(|dir| dir.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        files.sort();
        files
            .into_iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter(|m| m.lines().any(|l| l.eq_ignore_ascii_case(&format!("To: {recipient}"))))
            .collect()
    }

    /// The token of the last link to `path` (e.g. `/password-reset`) mailed
    /// to `recipient`.
    pub fn mailed_token(&self, recipient: &str, path: &str) -> Option<String> {
        let marker = format!("{path}#token=");
        self.mails_to(recipient)
            .iter()
            .rev()
            .find_map(|m| m.lines().find_map(|l| l.split_once(&marker).map(|(_, token)| token.trim().to_owned())))
    }

    /// Creates an entity as the national administrator (code, display name
    /// and slug from `code`); returns its id.
    pub async fn create_entity(&self, parent: &str, kind: &str, code: &str) -> anyhow::Result<String> {
        let (status, body) = self
            .call(
                Some(&self.admin_token),
                reqwest::Method::POST,
                "/api/v1/entities",
                None,
                Some(json!({ "requestId": Uuid::new_v4().to_string(),
                             "entity": { "parentId": parent, "kind": kind, "displayName": code, "code": code,
                                         "slug": code.to_lowercase() } })),
            )
            .await?;
        anyhow::ensure!(status == 200, "creating entity {code}: {body}");
        Ok(body["entity"]["id"].as_str().context("no entity id")?.to_owned())
    }

    /// The id of the built-in role `name`.
    pub async fn role_id(&self, name: &str) -> anyhow::Result<String> {
        let (status, roles) = self
            .call(Some(&self.admin_token), reqwest::Method::GET, "/api/v1/roles?pageSize=500", Some(&self.root), None)
            .await?;
        anyhow::ensure!(status == 200, "listing roles: {roles}");
        let role = roles["roles"].as_array().and_then(|all| all.iter().find(|r| r["name"] == name));
        Ok(role.and_then(|r| r["id"].as_str()).with_context(|| format!("no role {name}"))?.to_owned())
    }

    /// Grants `role` on `entity` to a user, as the national administrator;
    /// returns the grant id.
    pub async fn grant_user(&self, user: Uuid, role: &str, entity: &str, scope: &str) -> anyhow::Result<String> {
        let (status, body) = self
            .call(
                Some(&self.admin_token),
                reqwest::Method::POST,
                "/api/v1/grants",
                None,
                Some(json!({ "requestId": Uuid::new_v4().to_string(),
                             "grant": { "principal": { "kind": "ACTOR_KIND_USER", "id": user.to_string() },
                                        "roleId": self.role_id(role).await?, "entityId": entity, "scope": scope } })),
            )
            .await?;
        anyhow::ensure!(status == 200, "granting {role}: {body}");
        Ok(body["grant"]["id"].as_str().context("no grant id")?.to_owned())
    }

    /// Calls the edge with an optional token and acting entity.
    pub async fn call(
        &self,
        token: Option<&str>,
        method: reqwest::Method,
        path: &str,
        entity: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.request(method, format!("{}{path}", self.edge.url()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(entity) = entity {
            request = request.header("x-socle-entity", entity);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Uploads `file` as the raw body of a streamed REST route (a CRM
    /// import: `path_and_query` carries the options), acting for `entity`.
    pub async fn upload(&self, token: &str, path_and_query: &str, entity: &str, file: Vec<u8>) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path_and_query}", self.edge.url()))
            .bearer_auth(token)
            .header("x-socle-entity", entity)
            .header("content-type", "text/csv")
            .body(file)
            .send()
            .await
            .expect("the edge answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Posts `body` to a REST route whose response body is a raw file (a
    /// CRM export), acting for `entity`: (status, content type, content
    /// disposition, bytes).
    pub async fn download(&self, token: &str, path: &str, entity: &str, body: Value) -> (u16, String, String, Vec<u8>) {
        let response = self
            .http
            .post(format!("{}{path}", self.edge.url()))
            .bearer_auth(token)
            .header("x-socle-entity", entity)
            .json(&body)
            .send()
            .await
            .expect("the edge answers");
        let header =
            |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let (status, content_type, disposition) =
            (response.status().as_u16(), header("content-type"), header("content-disposition"));
        (status, content_type, disposition, response.bytes().await.expect("the body").to_vec())
    }

    /// The first audit event of `entity`'s trail that `wanted` accepts, read
    /// as the national administrator; waits up to 60 seconds for the
    /// outbox relays, then panics with the last page read.
    pub async fn wait_for_event(&self, entity: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let path = format!("/api/v1/audit/events?entityId={entity}&pageSize=500");
            let (status, body) =
                self.call(Some(&self.admin_token), reqwest::Method::GET, &path, None, None).await.expect("the edge");
            // 503 is retryable by contract (a loaded machine can exhaust the
            // audit service's small test pool); anything else is a failure.
            assert!(status == 200 || status == 503, "{status} {body}");
            if let Some(event) = body["events"].as_array().and_then(|events| events.iter().find(|e| wanted(e))) {
                return event.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "no matching audit event on {entity}; last page: {body}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// A gRPC request carrying `token` and acting for `entity`.
pub fn authed<T>(message: T, token: &str, entity: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("a header value"));
    request.metadata_mut().insert("x-socle-entity", entity.parse().expect("a header value"));
    request
}
