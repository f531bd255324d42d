//! A store on a fresh database, migrated and restricted like the service
//! does it, and event builders.

#![allow(dead_code)]

use std::time::Duration;

use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use socle_audit::{
    keys::Keys,
    store::{Store, StoreOptions},
};
use socle_config::SecretString;
use socle_proto::socle::{
    audit::v1::{AuditEvent, FieldChange, Outcome},
    r#type::v1::{ActorKind, ActorRef},
};
use socle_testkit::TestDatabase;
use uuid::Uuid;

pub struct Env {
    pub database: TestDatabase,
    pub store: Store,
}

pub async fn env(checkpoint_every: i64) -> Env {
    let database = TestDatabase::create("audit").await.unwrap();
    socle_db::migrate(
        &SecretString::from(database.owner_url.clone()),
        socle_audit::MIGRATIONS,
        Some(&database.app_role),
    )
    .await
    .unwrap();
    socle_audit::restrict_role(&database.owner_url, &database.app_role).await.unwrap();
    let db =
        socle_db::Database::connect(&SecretString::from(database.app_url_with_password()), 4, Duration::from_secs(5))
            .await
            .unwrap();
    let store = Store::open(db, Keys::ephemeral(), StoreOptions { checkpoint_every }).await.unwrap();
    Env { database, store }
}

impl Env {
    /// A superuser connection (the test cluster's admin).
    pub async fn superuser(&self) -> AsyncPgConnection {
        socle_db::admin::connect(&self.database.owner_url).await.unwrap()
    }

    /// Runs SQL as a superuser with triggers off: tampering "by hand".
    pub async fn tamper(&self, sql: &str) {
        let mut conn = self.superuser().await;
        conn.batch_execute(&format!("SET session_replication_role = replica; {sql}")).await.unwrap();
    }
}

pub fn user() -> ActorRef {
    ActorRef { kind: ActorKind::User as i32, id: Uuid::new_v4().to_string(), display_name: String::new() }
}

pub fn event(entity: Uuid, action: &str) -> AuditEvent {
    AuditEvent {
        id: Uuid::now_v7().to_string(),
        entity_id: entity.to_string(),
        actor: Some(user()),
        acting_entity_id: entity.to_string(),
        service: "crm".into(),
        action: action.into(),
        resource_type: "crm.organization".into(),
        resource_id: Uuid::new_v4().to_string(),
        outcome: Outcome::Ok as i32,
        request_id: Uuid::new_v4().to_string(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        occur_time: Some(prost_types::Timestamp { seconds: 1_750_000_000, nanos: 123_456_789 }),
        changes: vec![FieldChange {
            field_path: "legal_name".into(),
            before: Some(string("Ancien nom")),
            after: Some(string("Nouveau nom")),
            ..Default::default()
        }],
        details: Some(prost_types::Struct {
            fields: [("ratio".to_owned(), number(0.1 + 0.2)), ("big".to_owned(), number(1e21))].into(),
        }),
        ..Default::default()
    }
}

pub fn string(text: &str) -> prost_types::Value {
    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(text.into())) }
}

pub fn number(n: f64) -> prost_types::Value {
    prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(n)) }
}

/// Events validated like `AppendEvents` does, then appended.
pub async fn append(
    store: &Store,
    events: Vec<AuditEvent>,
) -> Result<Vec<socle_proto::socle::audit::v1::AppendEventResult>, socle_errors::Error> {
    store.append(socle_audit::validate::events(events)?).await
}
