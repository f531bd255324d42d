//! The store on a real PostgreSQL: idempotent appends, the chain, the
//! append-only guarantees, tampering found by `VerifyChain`, checkpoints,
//! crypto-shredding, queries.

mod common;

use common::{append, env, event, string};
use diesel_async::SimpleAsyncConnection;
use socle_audit::store::{EventFilter, VerifyRange};
use socle_errors::Code;
use socle_proto::socle::audit::v1::{BreakReason, ChainStatus, FieldChange, Outcome, VerifyChainResponse};
use uuid::Uuid;

fn broken(response: &VerifyChainResponse) -> (i64, BreakReason, String) {
    assert_eq!(response.status, ChainStatus::Broken as i32, "{response:?}");
    let b = response.first_break.as_ref().expect("a break");
    (b.sequence, BreakReason::try_from(b.reason).unwrap(), b.event_id.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn appends_chain_events_with_gapless_sequences_and_linked_hashes() {
    let env = env(1000).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let batch: Vec<_> = (0..5).map(|i| event(if i % 2 == 0 { a } else { b }, "crm.organizations.update")).collect();
    let results = append(&env.store, batch.clone()).await.unwrap();
    assert_eq!(results.iter().map(|r| r.sequence).collect::<Vec<_>>(), [1, 1, 2, 2, 3]);
    assert!(results.iter().all(|r| !r.duplicate && r.hash.len() == 64));
    let second = append(&env.store, vec![event(a, "crm.organizations.delete")]).await.unwrap();
    assert_eq!(second[0].sequence, 4);

    let chain = env.store.chain_events(a, 1, 10).await.unwrap();
    assert_eq!(chain.len(), 4);
    assert_eq!(chain[0].prev_hash, "0".repeat(64));
    for pair in chain.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    for e in &chain {
        assert_eq!(socle_audit::canonical::event_hash(e).unwrap(), e.hash);
        assert_eq!(e.encoding_version, 1);
        // Times are kept at microsecond precision.
        assert_eq!(e.occur_time.unwrap().nanos, 123_456_000);
    }
    let verified = env.store.verify(a, VerifyRange::default()).await.unwrap();
    assert_eq!(verified.status, ChainStatus::Ok as i32, "{verified:?}");
    assert_eq!((verified.start_sequence, verified.end_sequence, verified.verified_event_count), (1, 4, 4));
    assert_eq!(verified.head_hash, chain[3].hash);
    let part = env.store.verify(a, VerifyRange { start_sequence: 2, end_sequence: 3, ..Default::default() }).await;
    assert_eq!(part.unwrap().verified_event_count, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn redeliveries_are_acknowledged_and_conflicts_refused_all_or_nothing() {
    let env = env(1000).await;
    let entity = Uuid::new_v4();
    let mut first = event(entity, "crm.contacts.update");
    first.changes.push(FieldChange {
        field_path: "email".into(),
        before: Some(string("a@exemple.fr")),
        after: Some(string("b@exemple.fr")),
        personal_data: true,
        ..Default::default()
    });
    let stored = append(&env.store, vec![first.clone()]).await.unwrap();

    // The same event again (a relay retry), with a new one: acknowledged, not stored twice.
    let fresh = event(entity, "crm.contacts.update");
    let again = append(&env.store, vec![first.clone(), fresh]).await.unwrap();
    assert!(again[0].duplicate);
    assert_eq!((again[0].sequence, &again[0].hash), (stored[0].sequence, &stored[0].hash));
    assert!(!again[1].duplicate);
    assert_eq!(again[1].sequence, 2);

    // The same id with other content: ALREADY_EXISTS, and nothing of the batch is stored.
    let mut changed = first.clone();
    changed.changes[1].after = Some(string("c@exemple.fr"));
    let other = event(entity, "crm.contacts.update");
    let error = append(&env.store, vec![other.clone(), changed]).await.unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists);
    assert_eq!(error.violations()[0].field, "events[1].id");
    assert_eq!(env.store.chain_events(entity, 1, 10).await.unwrap().len(), 2);
    assert!(env.store.get(Uuid::parse_str(&other.id).unwrap()).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_events_are_refused_with_a_violation_naming_them() {
    let env = env(1000).await;
    let entity = Uuid::new_v4();
    let mut bad = event(entity, "Crm Update");
    bad.outcome = Outcome::Unspecified as i32;
    bad.changes[0].personal_data = true;
    bad.resource_id.clear();
    let error = append(&env.store, vec![event(entity, "crm.organizations.update"), bad]).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    let fields: Vec<&str> = error.violations().iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, ["events[1].action", "events[1].outcome", "events[1].changes[0].subject_id"]);
    let error = append(&env.store, vec![]).await.unwrap_err();
    assert_eq!(error.violations()[0].field, "events");
    assert!(env.store.chain_events(entity, 1, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn events_cannot_be_changed_by_the_service_role_nor_by_the_owner() {
    let env = env(1000).await;
    let entity = Uuid::new_v4();
    append(&env.store, vec![event(entity, "crm.organizations.update")]).await.unwrap();

    let mut app = socle_db::admin::connect(&env.database.app_url_with_password()).await.unwrap();
    for sql in [
        "UPDATE audit_events SET action = 'crm.organizations.read'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
        "UPDATE audit_checkpoints SET sequence = 0",
    ] {
        let error = app.batch_execute(&format!("SET socle.entity_scope = '*'; {sql}")).await.unwrap_err();
        assert!(error.to_string().contains("permission denied"), "{sql}: {error}");
    }
    // The owner (a superuser here) holds every privilege: the trigger refuses.
    let mut owner = env.superuser().await;
    for sql in ["UPDATE audit_events SET action = 'crm.organizations.read'", "DELETE FROM audit_events"] {
        let error = owner.batch_execute(sql).await.unwrap_err();
        assert!(error.to_string().contains("append-only"), "{sql}: {error}");
    }
    assert_eq!(env.store.chain_events(entity, 1, 10).await.unwrap()[0].action, "crm.organizations.update");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_changed_by_hand_is_named_by_verify() {
    let env = env(1000).await;
    let entity = Uuid::new_v4();
    let events: Vec<_> = (0..5).map(|_| event(entity, "crm.organizations.update")).collect();
    append(&env.store, events.clone()).await.unwrap();
    env.tamper(&format!("UPDATE audit_events SET outcome = 2 WHERE entity_id = '{entity}' AND sequence = 3")).await;
    let response = env.store.verify(entity, VerifyRange::default()).await.unwrap();
    assert_eq!(broken(&response), (3, BreakReason::HashMismatch, events[2].id.clone()));
    assert_eq!(response.verified_event_count, 2);
    let b = response.first_break.unwrap();
    assert_ne!(b.expected_hash, b.actual_hash);

    // Recomputing that row's hash moves the break to the next link.
    let mut row = env.store.chain_events(entity, 3, 3).await.unwrap().remove(0);
    row.hash = socle_audit::canonical::event_hash(&row).unwrap();
    env.tamper(&format!("UPDATE audit_events SET hash = '{}' WHERE id = '{}'", row.hash, row.id)).await;
    let response = env.store.verify(entity, VerifyRange::default()).await.unwrap();
    assert_eq!(broken(&response), (4, BreakReason::PrevHashMismatch, events[3].id.clone()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_row_is_a_sequence_gap_even_at_the_end() {
    let env = env(1000).await;
    let entity = Uuid::new_v4();
    append(&env.store, (0..4).map(|_| event(entity, "crm.organizations.update")).collect()).await.unwrap();
    env.tamper(&format!("DELETE FROM audit_events WHERE entity_id = '{entity}' AND sequence = 2")).await;
    let response = env.store.verify(entity, VerifyRange::default()).await.unwrap();
    assert_eq!(broken(&response), (2, BreakReason::SequenceGap, String::new()));

    let other = Uuid::new_v4();
    append(&env.store, (0..3).map(|_| event(other, "crm.organizations.update")).collect()).await.unwrap();
    env.tamper(&format!("DELETE FROM audit_events WHERE entity_id = '{other}' AND sequence = 3")).await;
    let response = env.store.verify(other, VerifyRange::default()).await.unwrap();
    assert_eq!(broken(&response), (3, BreakReason::SequenceGap, String::new()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_rewritten_after_a_checkpoint_is_caught_by_the_checkpoint() {
    let env = env(3).await;
    let entity = Uuid::new_v4();
    append(&env.store, (0..4).map(|_| event(entity, "crm.organizations.update")).collect()).await.unwrap();
    let (checkpoints, _) = env.store.list_checkpoints(entity, None, None, None, 10).await.unwrap();
    assert_eq!(checkpoints.len(), 1, "one checkpoint after 3 events");
    assert_eq!(checkpoints[0].sequence, 4);

    // Rewrite event 2 and recompute every hash after it: the chain links again.
    let mut chain = env.store.chain_events(entity, 1, 4).await.unwrap();
    chain[1].outcome = Outcome::Denied as i32;
    let mut sql = String::new();
    for i in 1..chain.len() {
        chain[i].prev_hash = chain[i - 1].hash.clone();
        chain[i].hash = socle_audit::canonical::event_hash(&chain[i]).unwrap();
        sql.push_str(&format!(
            "UPDATE audit_events SET outcome = {}, prev_hash = '{}', hash = '{}' WHERE id = '{}';",
            chain[i].outcome, chain[i].prev_hash, chain[i].hash, chain[i].id
        ));
    }
    env.tamper(&sql).await;
    let response = env.store.verify(entity, VerifyRange::default()).await.unwrap();
    let (sequence, reason, event_id) = broken(&response);
    assert_eq!((sequence, reason, event_id), (4, BreakReason::CheckpointMismatch, chain[3].id.clone()));
    assert_eq!(response.first_break.unwrap().checkpoint_id, checkpoints[0].id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_checkpoint_signature_is_refused() {
    let env = env(2).await;
    let entity = Uuid::new_v4();
    append(&env.store, (0..2).map(|_| event(entity, "crm.organizations.update")).collect()).await.unwrap();
    let response = env.store.verify(entity, VerifyRange::default()).await.unwrap();
    assert_eq!((response.status, response.verified_checkpoint_count), (ChainStatus::Ok as i32, 1));
    env.tamper(&format!(
        "UPDATE audit_checkpoints SET signature = overlay(signature PLACING '\\x00'::bytea FROM 1 FOR 1)
          WHERE entity_id = '{entity}'"
    ))
    .await;
    let response = env.store.verify(entity, VerifyRange::default()).await.unwrap();
    assert_eq!(broken(&response).1, BreakReason::CheckpointSignatureInvalid);

    // A signed payload rewritten with another head is refused as well.
    let other = Uuid::new_v4();
    append(&env.store, (0..2).map(|_| event(other, "crm.organizations.update")).collect()).await.unwrap();
    env.tamper(&format!("UPDATE audit_checkpoints SET head_hash = repeat('f', 64) WHERE entity_id = '{other}'")).await;
    let response = env.store.verify(other, VerifyRange::default()).await.unwrap();
    assert_eq!(broken(&response).1, BreakReason::CheckpointSignatureInvalid);
}

#[tokio::test(flavor = "multi_thread")]
async fn shredding_a_subject_erases_its_values_and_keeps_the_chain_verifiable() {
    let env = env(2).await;
    let entity = Uuid::new_v4();
    let person = Uuid::new_v4().to_string();
    let mut with_personal = event(entity, "crm.contacts.update");
    with_personal.resource_id = person.clone();
    with_personal.changes.push(FieldChange {
        field_path: "email".into(),
        before: Some(string("jeanne@exemple.fr")),
        after: Some(string("jeanne.d@exemple.fr")),
        personal_data: true,
        ..Default::default()
    });
    let mut other_person = event(entity, "crm.contacts.update");
    other_person.changes = vec![FieldChange {
        field_path: "phone".into(),
        after: Some(string("+33612345678")),
        personal_data: true,
        subject_id: "someone-else".into(),
        ..Default::default()
    }];
    append(&env.store, vec![with_personal.clone(), other_person.clone()]).await.unwrap();
    let id = Uuid::parse_str(&with_personal.id).unwrap();

    // Stored encrypted: the plaintext is nowhere in the table.
    let stored = env.store.chain_events(entity, 1, 1).await.unwrap().remove(0);
    let sealed = stored.changes[1].sealed.as_ref().expect("sealed");
    assert!(stored.changes[1].before.is_none() && !sealed.ciphertext.is_empty() && sealed.commitment.len() == 32);
    let mut conn = env.superuser().await;
    let leak: Vec<socle_audit::store::EventRow> = diesel_async::RunQueryDsl::load(
        diesel::sql_query(format!(
            "SELECT {} FROM audit_events WHERE changes LIKE '%jeanne%'",
            socle_audit::store::EVENT_COLUMNS
        )),
        &mut conn,
    )
    .await
    .unwrap();
    assert!(leak.is_empty());

    // Read back decrypted.
    let read = env.store.get(id).await.unwrap().unwrap();
    assert_eq!(read.changes[1].before, Some(string("jeanne@exemple.fr")));
    assert_eq!(read.changes[1].subject_id, person);
    assert!(!read.changes[1].erased && read.changes[1].sealed.is_none());

    assert_eq!(env.store.shred_subject(&person).await.unwrap(), 1);
    let read = env.store.get(id).await.unwrap().unwrap();
    assert!(read.changes[1].erased);
    assert!(read.changes[1].before.is_none() && read.changes[1].after.is_none());
    assert_eq!(read.changes[0].after, Some(string("Nouveau nom")), "non-personal values stay");
    let other = env.store.get(Uuid::parse_str(&other_person.id).unwrap()).await.unwrap().unwrap();
    assert_eq!(other.changes[0].after, Some(string("+33612345678")), "other subjects are untouched");

    let response = env.store.verify(entity, VerifyRange::default()).await.unwrap();
    assert_eq!(response.status, ChainStatus::Ok as i32, "{response:?}");
    assert_eq!((response.verified_event_count, response.verified_checkpoint_count), (2, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_filter_and_paginate_newest_first() {
    let env = env(1000).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut events = Vec::new();
    for i in 0..7 {
        let mut e =
            event(if i < 5 { a } else { b }, if i % 2 == 0 { "crm.contacts.update" } else { "cms.pages.publish" });
        e.occur_time = Some(prost_types::Timestamp { seconds: 1_750_000_000 + i, nanos: 0 });
        if i == 3 {
            e.outcome = Outcome::Denied as i32;
        }
        events.push(e);
    }
    append(&env.store, events.clone()).await.unwrap();

    let filter = EventFilter { entities: vec![a], ..Default::default() };
    let (page, next) = env.store.query(filter.clone(), None, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| &e.id).collect::<Vec<_>>(), [&events[4].id, &events[3].id]);
    let (page, next) = env.store.query(filter.clone(), next, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| &e.id).collect::<Vec<_>>(), [&events[2].id, &events[1].id]);
    let (page, next) = env.store.query(filter.clone(), next, 2).await.unwrap();
    assert_eq!((page.len(), next), (1, None));

    let prefix = EventFilter { action_prefixes: vec!["crm.contacts.".into()], ..filter.clone() };
    assert_eq!(env.store.query(prefix, None, 50).await.unwrap().0.len(), 3);
    let denied = EventFilter { outcomes: vec![Outcome::Denied as i16], ..filter.clone() };
    assert_eq!(env.store.query(denied, None, 50).await.unwrap().0[0].id, events[3].id);
    let both = EventFilter { entities: vec![a, b], ascending: true, ..Default::default() };
    let all = env.store.query(both, None, 50).await.unwrap().0;
    assert_eq!(all.len(), 7);
    assert_eq!(all[0].id, events[0].id);
    let by_resource =
        EventFilter { resource_id: Some(events[5].resource_id.clone()), entities: vec![a, b], ..Default::default() };
    assert_eq!(env.store.query(by_resource, None, 50).await.unwrap().0.len(), 1);
    // The scope is also enforced by row-level security: entity b's rows are
    // invisible to a transaction scoped to a, whatever the query says.
    let scoped = env
        .store
        .database()
        .transaction(&socle_db::EntityScope::entity(a), |conn| {
            Box::pin(async move {
                let rows: Vec<socle_audit::store::EventRow> = diesel_async::RunQueryDsl::load(
                    diesel::sql_query(format!("SELECT {} FROM audit_events", socle_audit::store::EVENT_COLUMNS)),
                    conn,
                )
                .await
                .map_err(socle_db::DbError::from)?;
                Ok::<_, socle_db::DbError>(rows.len())
            })
        })
        .await
        .unwrap();
    assert_eq!(scoped, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_appends_to_one_chain_are_serialised_without_gaps() {
    let env = env(7).await;
    let entity = Uuid::new_v4();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = env.store.clone();
        tasks.push(tokio::spawn(async move {
            append(&store, (0..5).map(|_| event(entity, "crm.organizations.update")).collect()).await.unwrap()
        }));
    }
    let mut sequences: Vec<i64> = Vec::new();
    for task in tasks {
        sequences.extend(task.await.unwrap().iter().map(|r| r.sequence));
    }
    sequences.sort();
    assert_eq!(sequences, (1..=40).collect::<Vec<_>>());
    let response = env.store.verify(entity, VerifyRange::default()).await.unwrap();
    assert_eq!((response.status, response.verified_event_count), (ChainStatus::Ok as i32, 40));
    assert!(response.verified_checkpoint_count >= 4, "{response:?}");
}
