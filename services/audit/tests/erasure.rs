//! Erasure by event (`AuditEvent.erase_subject_ids`) on a real PostgreSQL:
//! the earlier values of an erased person read back erased while the chains
//! still verify, their later values are stored erased, redeliveries across
//! an erasure stay duplicates, exports with an erasing event verify offline,
//! tombstones are append-only, invalid ids are refused; and over gRPC.

mod common;

use std::{io::BufReader, process::Command};

use common::{append, env, event, string};
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Nullable, Text, Uuid as SqlUuid},
};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use socle_audit::store::VerifyRange;
use socle_errors::Code;
use socle_proto::socle::audit::v1::{
    AppendEventsRequest, AuditEvent, BreakReason, ChainStatus, ExportEventsRequest, FieldChange, GetEventRequest,
    audit_event_service_client::AuditEventServiceClient,
};
use socle_testkit::{Service, spawn_service};
use tokio::sync::mpsc;
use uuid::Uuid;

fn personal(field: &str, subject: &str, value: &str) -> FieldChange {
    FieldChange {
        field_path: field.into(),
        after: Some(string(value)),
        personal_data: true,
        subject_id: subject.into(),
        ..Default::default()
    }
}

/// A contact update with one plain change (`legal_name`) and the email of `subject`.
fn contact_update(entity: Uuid, subject: &str, email: &str) -> AuditEvent {
    let mut e = event(entity, "crm.contacts.update");
    e.resource_type = "crm.contact".into();
    e.resource_id = subject.into();
    e.changes.push(personal("email", subject, email));
    e
}

/// The erasure of `subjects`, which also records the erased email of the first.
fn contact_erase(entity: Uuid, subjects: &[&str], email: &str) -> AuditEvent {
    let mut e = event(entity, "crm.contacts.erase");
    e.resource_type = "crm.contact".into();
    e.resource_id = subjects[0].into();
    e.changes = vec![FieldChange {
        field_path: "email".into(),
        before: Some(string(email)),
        personal_data: true,
        subject_id: subjects[0].into(),
        ..Default::default()
    }];
    e.erase_subject_ids = subjects.iter().map(|s| s.to_string()).collect();
    e
}

fn id(event: &AuditEvent) -> Uuid {
    Uuid::parse_str(&event.id).unwrap()
}

async fn read(env: &common::Env, event: &AuditEvent) -> AuditEvent {
    env.store.get(id(event)).await.unwrap().expect("stored")
}

/// The personal change of `event` as read back (decrypted or erased).
async fn read_personal(env: &common::Env, event: &AuditEvent) -> FieldChange {
    read(env, event).await.changes.into_iter().find(|c| c.personal_data).expect("a personal change")
}

fn is_erased(change: &FieldChange) -> bool {
    change.erased && change.before.is_none() && change.after.is_none() && change.sealed.is_none()
}

/// The key id the personal change of `event` is sealed under, as stored.
async fn sealed_key_id(env: &common::Env, event: &AuditEvent) -> String {
    let entity = Uuid::parse_str(&event.entity_id).unwrap();
    let chain = env.store.chain_events(entity, 1, 1000).await.unwrap();
    let stored = chain.into_iter().find(|e| e.id == event.id).expect("in its chain");
    stored.changes.into_iter().find_map(|c| c.sealed).expect("sealed").key_id
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct TombstoneRow {
    #[diesel(sql_type = Nullable<SqlUuid>)]
    event_id: Option<Uuid>,
}

async fn key_count(env: &common::Env, subject: &str) -> i64 {
    let mut conn = env.superuser().await;
    let row: Count = diesel::sql_query("SELECT count(*) AS n FROM audit_subject_keys WHERE subject_id = $1")
        .bind::<Text, _>(subject)
        .get_result(&mut conn)
        .await
        .unwrap();
    row.n
}

/// `Some(event id or None)` when `subject` is tombstoned.
async fn tombstone(env: &common::Env, subject: &str) -> Option<Option<Uuid>> {
    let mut conn = env.superuser().await;
    let rows: Vec<TombstoneRow> = diesel::sql_query("SELECT event_id FROM audit_erased_subjects WHERE subject_id = $1")
        .bind::<Text, _>(subject)
        .load(&mut conn)
        .await
        .unwrap();
    rows.into_iter().next().map(|r| r.event_id)
}

async fn verified(env: &common::Env, entity: Uuid) -> (i64, i32) {
    let response = env.store.verify(entity, VerifyRange::default()).await.unwrap();
    assert_eq!(response.status, ChainStatus::Ok as i32, "{response:?}");
    (response.verified_event_count, response.verified_checkpoint_count)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erasing_event_erases_the_earlier_values_of_its_subjects_and_the_chains_still_verify() {
    let env = env(3).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (jeanne, paul) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let earlier = contact_update(a, &jeanne, "jeanne@exemple.fr");
    let elsewhere = contact_update(b, &jeanne, "jeanne.b@exemple.fr");
    let other = contact_update(a, &paul, "paul@exemple.fr");
    append(&env.store, vec![earlier.clone(), elsewhere.clone(), other.clone()]).await.unwrap();
    assert_eq!(read_personal(&env, &earlier).await.after, Some(string("jeanne@exemple.fr")));
    assert_eq!(key_count(&env, &jeanne).await, 1);

    // In one batch: values before the erasure, the erasure (with a value of
    // its own), values after it.
    let before = contact_update(a, &jeanne, "jeanne.d@exemple.fr");
    let erase = contact_erase(a, &[&jeanne], "jeanne.d@exemple.fr");
    let after = contact_update(a, &jeanne, "jeanne.late@exemple.fr");
    let results = append(&env.store, vec![before.clone(), erase.clone(), after.clone()]).await.unwrap();
    assert_eq!(
        results.iter().map(|r| (r.sequence, r.duplicate)).collect::<Vec<_>>(),
        [(3, false), (4, false), (5, false)]
    );

    for e in [&earlier, &elsewhere, &before, &erase, &after] {
        let change = read_personal(&env, e).await;
        assert!(is_erased(&change), "{} {change:?}", e.action);
        assert_eq!(change.subject_id, jeanne);
    }
    let read_back = read(&env, &earlier).await;
    assert_eq!(read_back.changes[0].after, Some(string("Nouveau nom")), "plain values stay");
    assert_eq!(read_personal(&env, &other).await.after, Some(string("paul@exemple.fr")), "other people stay");
    assert_eq!(read(&env, &erase).await.erase_subject_ids, vec![jeanne.clone()]);

    // The event before the erasure was sealed under Jeanne's key (then
    // destroyed); the erasure and the later event under throwaway keys.
    let real = sealed_key_id(&env, &earlier).await;
    assert_eq!(sealed_key_id(&env, &before).await, real);
    let (own, late) = (sealed_key_id(&env, &erase).await, sealed_key_id(&env, &after).await);
    assert!(own != real && late != real && own != late);
    assert_eq!(key_count(&env, &jeanne).await, 0);
    assert_eq!(key_count(&env, &paul).await, 1);
    assert_eq!(tombstone(&env, &jeanne).await, Some(Some(id(&erase))));
    assert_eq!(tombstone(&env, &paul).await, None);

    // The chains verify, checkpoints included.
    assert_eq!(verified(&env, a).await, (5, 1));
    assert_eq!(verified(&env, b).await, (1, 0));

    // The erased subjects are content: covered by the hash.
    env.tamper(&format!("UPDATE audit_events SET erase_subject_ids = '[]' WHERE id = '{}'", erase.id)).await;
    let response = env.store.verify(a, VerifyRange::default()).await.unwrap();
    let first_break = response.first_break.expect("a break");
    assert_eq!((first_break.sequence, first_break.reason), (4, BreakReason::HashMismatch as i32));
}

#[tokio::test(flavor = "multi_thread")]
async fn values_of_an_erased_subject_appended_later_are_stored_erased() {
    let env = env(1000).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (jeanne, paul) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    // Erased before the audit trail ever saw a value of hers: no key at all.
    let erase = contact_erase(a, &[&jeanne], "jeanne@exemple.fr");
    append(&env.store, vec![erase.clone()]).await.unwrap();
    assert!(is_erased(&read_personal(&env, &erase).await));

    let late = contact_update(b, &jeanne, "jeanne@exemple.fr");
    let other = contact_update(b, &paul, "paul@exemple.fr");
    append(&env.store, vec![late.clone(), other.clone()]).await.unwrap();
    assert!(is_erased(&read_personal(&env, &late).await));
    assert_eq!(read_personal(&env, &other).await.after, Some(string("paul@exemple.fr")));
    assert_eq!(key_count(&env, &jeanne).await, 0, "no key is created for an erased subject");
    assert_eq!(verified(&env, b).await, (2, 0));

    // Nor is the plaintext anywhere in the table.
    let mut conn = env.superuser().await;
    let leaks: Count = diesel::sql_query("SELECT count(*) AS n FROM audit_events WHERE changes LIKE '%jeanne@%'")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(leaks.n, 0);

    // `shred_subject` tombstones too, without an event; the first erasure is kept.
    append(&env.store, vec![contact_update(a, &paul, "paul.2@exemple.fr")]).await.unwrap();
    assert_eq!(env.store.shred_subject(&paul).await.unwrap(), 1);
    assert_eq!(tombstone(&env, &paul).await, Some(None));
    let later = contact_update(a, &paul, "paul.3@exemple.fr");
    append(&env.store, vec![later.clone()]).await.unwrap();
    assert!(is_erased(&read_personal(&env, &later).await));
    assert!(is_erased(&read_personal(&env, &other).await));
    assert_eq!(env.store.shred_subject(&jeanne).await.unwrap(), 0);
    assert_eq!(tombstone(&env, &jeanne).await, Some(Some(id(&erase))));
    assert_eq!(verified(&env, a).await, (3, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn redeliveries_across_an_erasure_are_duplicates_and_conflicts_are_still_refused() {
    let env = env(1000).await;
    let entity = Uuid::new_v4();
    let (jeanne, paul) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let mut earlier = contact_update(entity, &jeanne, "jeanne@exemple.fr");
    earlier.changes.push(personal("manager_email", &paul, "paul@exemple.fr"));
    let stored = append(&env.store, vec![earlier.clone()]).await.unwrap();
    let batch = vec![
        contact_update(entity, &jeanne, "jeanne.d@exemple.fr"),
        contact_erase(entity, &[&jeanne], "jeanne.d@exemple.fr"),
        contact_update(entity, &jeanne, "jeanne.late@exemple.fr"),
    ];
    let first = append(&env.store, batch.clone()).await.unwrap();

    // The relay retries the batch (its acknowledgement was lost): every
    // event is a duplicate, with its stored sequence and hash.
    let again = append(&env.store, batch.clone()).await.unwrap();
    assert!(again.iter().all(|r| r.duplicate), "{again:?}");
    assert_eq!(
        again.iter().map(|r| (r.sequence, &r.hash)).collect::<Vec<_>>(),
        first.iter().map(|r| (r.sequence, &r.hash)).collect::<Vec<_>>()
    );
    // The erasing event alone, the late event alone, and an event stored
    // before the erasure (Jeanne's key is gone since) with a new one.
    let erase_again = append(&env.store, vec![batch[1].clone()]).await.unwrap();
    assert_eq!((erase_again[0].duplicate, erase_again[0].sequence), (true, 3));
    let late_again = append(&env.store, vec![batch[2].clone()]).await.unwrap();
    assert_eq!((late_again[0].duplicate, late_again[0].sequence), (true, 4));
    let fresh = contact_update(entity, &paul, "paul.2@exemple.fr");
    let mixed = append(&env.store, vec![earlier.clone(), fresh]).await.unwrap();
    assert_eq!((mixed[0].duplicate, mixed[0].sequence, &mixed[0].hash), (true, 1, &stored[0].hash));
    assert_eq!((mixed[1].duplicate, mixed[1].sequence), (false, 5));

    // Other content under a stored id is still refused, whole batch.
    let conflict = |event: AuditEvent, what: &str| {
        let store = env.store.clone();
        let what = what.to_owned();
        async move {
            let newcomer = event_for_conflicts();
            let error = append(&store, vec![newcomer.clone(), event]).await.unwrap_err();
            assert_eq!(error.code(), Code::AlreadyExists, "{what}");
            assert_eq!(error.violations()[0].field, "events[1].id", "{what}");
            assert!(store.get(id(&newcomer)).await.unwrap().is_none(), "{what}");
        }
    };
    let mut reason = batch[1].clone();
    reason.reason = "asked by the person".into();
    conflict(reason, "a plain field of the erasing event").await;
    let mut more = batch[1].clone();
    more.erase_subject_ids.push(paul.clone());
    conflict(more, "the subjects it erases").await;
    let mut manager = earlier.clone();
    manager.changes[2].after = Some(string("pierre@exemple.fr"));
    conflict(manager, "a value of a subject not erased").await;
    let mut plain = batch[2].clone();
    plain.changes[0].after = Some(string("Autre nom"));
    conflict(plain, "a plain value of a late event").await;

    // The values of an erased subject cannot be compared any more (their
    // key is gone): a redelivery differing only there is a duplicate.
    let mut erased_value = earlier.clone();
    erased_value.changes[1].after = Some(string("someone@exemple.fr"));
    assert!(append(&env.store, vec![erased_value]).await.unwrap()[0].duplicate);

    assert_eq!(env.store.chain_events(entity, 1, 100).await.unwrap().len(), 5);
    assert_eq!(verified(&env, entity).await.0, 5);
    assert_eq!(key_count(&env, &jeanne).await, 0);
}

fn event_for_conflicts() -> AuditEvent {
    event(Uuid::new_v4(), "crm.organizations.update")
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_erase_subject_ids_are_refused_with_field_violations() {
    let env = env(1000).await;
    let entity = Uuid::new_v4();
    let mut bad = contact_erase(entity, &["s-1"], "a@exemple.fr");
    bad.erase_subject_ids = vec![String::new(), "x".repeat(201), "s-1".into(), "s-1".into()];
    let mut too_many = event(entity, "crm.contacts.erase");
    too_many.erase_subject_ids = (0..101).map(|i| format!("s-{i}")).collect();
    let error = append(&env.store, vec![event(entity, "crm.contacts.update"), bad, too_many]).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    let fields: Vec<&str> = error.violations().iter().map(|v| v.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "events[1].erase_subject_ids[0]",
            "events[1].erase_subject_ids[1]",
            "events[1].erase_subject_ids[3]",
            "events[2].erase_subject_ids",
        ]
    );
    assert!(env.store.chain_events(entity, 1, 10).await.unwrap().is_empty());

    // At the limits: 100 ids of 200 characters (multi-byte ones count once).
    let mut limits = event(entity, "crm.contacts.erase");
    limits.erase_subject_ids = (0..100).map(|i| format!("{i:03}{}", "é".repeat(197))).collect();
    append(&env.store, vec![limits]).await.unwrap();
    assert_eq!(verified(&env, entity).await.0, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tombstones_cannot_be_removed_by_the_service_role_nor_by_the_owner() {
    let env = env(1000).await;
    let subject = Uuid::new_v4().to_string();
    append(&env.store, vec![contact_erase(Uuid::new_v4(), &[&subject], "a@exemple.fr")]).await.unwrap();
    let mut app = socle_db::admin::connect(&env.database.app_url_with_password()).await.unwrap();
    for sql in [
        "UPDATE audit_erased_subjects SET subject_id = 'x'",
        "DELETE FROM audit_erased_subjects",
        "TRUNCATE audit_erased_subjects",
    ] {
        let error = app.batch_execute(sql).await.unwrap_err();
        assert!(error.to_string().contains("permission denied"), "{sql}: {error}");
    }
    let mut owner = env.superuser().await;
    for sql in ["UPDATE audit_erased_subjects SET subject_id = 'x'", "DELETE FROM audit_erased_subjects"] {
        let error = owner.batch_execute(sql).await.unwrap_err();
        assert!(error.to_string().contains("append-only"), "{sql}: {error}");
    }
    assert!(tombstone(&env, &subject).await.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erasure_concurrent_with_appends_of_its_subject_leaves_every_value_erased() {
    let env = env(1000).await;
    let subject = Uuid::new_v4().to_string();
    let entities: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    let mut tasks = Vec::new();
    for (n, &entity) in entities.iter().enumerate() {
        let (store, subject) = (env.store.clone(), subject.clone());
        tasks.push(tokio::spawn(async move {
            let mut appended = Vec::new();
            for round in 0..4 {
                if n == 0 && round == 1 {
                    let erase = contact_erase(entity, &[&subject], "jeanne@exemple.fr");
                    append(&store, vec![erase.clone()]).await.unwrap();
                    appended.push(erase);
                }
                let e = contact_update(entity, &subject, &format!("jeanne.{round}@exemple.fr"));
                append(&store, vec![e.clone()]).await.unwrap();
                appended.push(e);
            }
            appended
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    // Whatever the interleaving: values before the erasure lost their key
    // with it, values after it were stored erased; no key survives.
    for e in &all {
        assert!(is_erased(&read_personal(&env, e).await), "{e:?}");
    }
    assert_eq!(key_count(&env, &subject).await, 0);
    for entity in entities {
        verified(&env, entity).await;
    }
}

async fn export_text(env: &common::Env, entities: &[Uuid]) -> String {
    let (tx, mut rx) = mpsc::channel(1024);
    let store = env.store.clone();
    let entities = entities.to_vec();
    let producer = tokio::spawn(async move { socle_audit::export::export(&store, &entities, None, None, &tx).await });
    let mut text = String::new();
    while let Some(line) = rx.recv().await {
        text.push_str(&line);
    }
    producer.await.unwrap().unwrap();
    text
}

/// `socle-audit verify FILE`, the real binary: (exit code, stdout).
fn verify_file(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.jsonl");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_socle-audit")).arg("verify").arg(&path).output().unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_with_an_erasing_event_verifies_offline() {
    let env = env(1000).await;
    let entity = Uuid::new_v4();
    let jeanne = Uuid::new_v4().to_string();
    append(&env.store, vec![contact_update(entity, &jeanne, "jeanne@exemple.fr")]).await.unwrap();
    let erase = contact_erase(entity, &[&jeanne, "someone-else"], "jeanne@exemple.fr");
    append(&env.store, vec![erase, contact_update(entity, &jeanne, "jeanne.late@exemple.fr")]).await.unwrap();
    let text = export_text(&env, &[entity]).await;
    assert!(!text.contains("jeanne"), "personal values are exported sealed");
    let mut lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[2]["event"]["eraseSubjectIds"], serde_json::json!([jeanne, "someone-else"]));
    assert!(lines[1]["event"].get("eraseSubjectIds").is_none(), "absent when empty");

    let (status, out) = verify_file(&text);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("OK: 3 events of 1 entities and 1 checkpoints"), "{out}");
    let report = socle_audit::export::verify_export(BufReader::new(text.as_bytes())).unwrap();
    assert_eq!((report.events, report.checkpoints), (3, 1));

    // An erasure removed from the file (or reordered) is an edited event.
    lines[2]["event"]["eraseSubjectIds"] = serde_json::json!(["someone-else", jeanne]);
    let edited: String = lines.iter().map(|v| format!("{v}\n")).collect();
    let (status, out) = verify_file(&edited);
    assert_eq!(status, 1);
    assert!(out.contains("line 3: BREAK_REASON_HASH_MISMATCH"), "{out}");
    lines[2]["event"].as_object_mut().unwrap().remove("eraseSubjectIds");
    let edited: String = lines.iter().map(|v| format!("{v}\n")).collect();
    assert!(verify_file(&edited).1.contains("line 3: BREAK_REASON_HASH_MISMATCH"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_erases_the_subjects_named_by_an_appended_event() {
    let audit = spawn_service(Service::Audit).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(audit.url()).unwrap().connect().await.unwrap();
    let mut client = AuditEventServiceClient::new(channel);
    let entity = Uuid::new_v4();
    let jeanne = Uuid::new_v4().to_string();
    let earlier = contact_update(entity, &jeanne, "jeanne@exemple.fr");
    client.append_events(AppendEventsRequest { events: vec![earlier.clone()] }).await.unwrap();
    let get = |event: &AuditEvent| GetEventRequest { event_id: event.id.clone() };
    let got = client.get_event(get(&earlier)).await.unwrap().into_inner().event.unwrap();
    assert_eq!(got.changes[1].after, Some(string("jeanne@exemple.fr")));

    let erase = contact_erase(entity, &[&jeanne], "jeanne@exemple.fr");
    let later = contact_update(entity, &jeanne, "jeanne.late@exemple.fr");
    let request = AppendEventsRequest { events: vec![erase.clone(), later.clone()] };
    let appended = client.append_events(request.clone()).await.unwrap().into_inner();
    assert_eq!(appended.results.iter().map(|r| r.sequence).collect::<Vec<_>>(), [2, 3]);
    let again = client.append_events(request).await.unwrap().into_inner();
    assert!(again.results.iter().all(|r| r.duplicate));
    for e in [&earlier, &later] {
        let got = client.get_event(get(e)).await.unwrap().into_inner().event.unwrap();
        assert!(got.changes[1].erased && got.changes[1].after.is_none(), "{got:?}");
    }
    let got = client.get_event(get(&erase)).await.unwrap().into_inner().event.unwrap();
    assert_eq!(got.erase_subject_ids, vec![jeanne]);

    // Exported and verified offline.
    let request = ExportEventsRequest { entity_id: entity.to_string(), ..Default::default() };
    let mut stream = client.export_events(request).await.unwrap().into_inner();
    let mut file = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        file.extend_from_slice(&chunk.chunk);
    }
    let report = socle_audit::export::verify_export(BufReader::new(file.as_slice())).unwrap();
    assert_eq!(report.events, 3);

    // Invalid ids: INVALID_ARGUMENT with a field violation.
    let mut invalid = event(entity, "crm.contacts.erase");
    invalid.erase_subject_ids = vec![String::new()];
    let status = client.append_events(AppendEventsRequest { events: vec![invalid] }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let problem = socle_errors::Problem::from_status(&status, None);
    assert_eq!(problem.violations.len(), 1, "{problem:?}");
    assert_eq!(problem.violations[0].field, "events[0].eraseSubjectIds[0]");
}
