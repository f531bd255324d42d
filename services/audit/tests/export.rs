//! Exports and the offline verifier, run as the real binary
//! (`socle-audit verify FILE`) on a good export and on edited ones.

mod common;

use std::process::Command;

use common::{append, env, event, string};
use socle_proto::socle::audit::v1::FieldChange;
use tokio::sync::mpsc;
use uuid::Uuid;

async fn export_text(env: &common::Env, entities: &[Uuid], start: Option<chrono::DateTime<chrono::Utc>>) -> String {
    let (tx, mut rx) = mpsc::channel(1024);
    let store = env.store.clone();
    let entities = entities.to_vec();
    let producer = tokio::spawn(async move { socle_audit::export::export(&store, &entities, start, None, &tx).await });
    let mut text = String::new();
    while let Some(line) = rx.recv().await {
        text.push_str(&line);
    }
    producer.await.unwrap().unwrap();
    text
}

fn verify_file(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.jsonl");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_socle-audit")).arg("verify").arg(&path).output().unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
}

fn lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn rejoin(values: &[serde_json::Value]) -> String {
    values.iter().map(|v| format!("{v}\n")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_verifies_offline_and_an_edited_line_is_named() {
    let env = env(3).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut events: Vec<_> = (0..5).map(|i| event(if i < 4 { a } else { b }, "crm.organizations.update")).collect();
    events[1].changes.push(FieldChange {
        field_path: "email".into(),
        after: Some(string("jeanne@exemple.fr")),
        personal_data: true,
        ..Default::default()
    });
    append(&env.store, events).await.unwrap();
    let text = export_text(&env, &[a, b], None).await;

    // header, a1..a4, the checkpoint of the batch (a@4), b1, the final checkpoint (b@1).
    let parsed = lines(&text);
    assert_eq!(parsed[0]["header"]["format"], "socle-audit-export/v1");
    assert_eq!(parsed[0]["header"]["signingKeys"].as_array().unwrap().len(), 1);
    let kinds: Vec<&str> = parsed[1..].iter().map(|l| if l.get("event").is_some() { "e" } else { "c" }).collect();
    assert_eq!(kinds.concat(), "eeeecec");
    assert!(!text.contains("jeanne"), "personal values are exported sealed");
    assert!(parsed[2]["event"]["changes"][1]["sealed"]["ciphertext"].is_string());

    let (status, out) = verify_file(&text);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("OK: 5 events of 2 entities and 2 checkpoints"), "{out}");

    // An event edited in the file: its line is named, with the reason.
    let mut edited = parsed.clone();
    edited[3]["event"]["outcome"] = "OUTCOME_DENIED".into();
    let (status, out) = verify_file(&rejoin(&edited));
    assert_eq!(status, 1);
    assert!(out.contains("line 4: BREAK_REASON_HASH_MISMATCH"), "{out}");

    // An event removed from the file: a gap at the next line.
    let mut removed = parsed.clone();
    removed.remove(2);
    let (status, out) = verify_file(&rejoin(&removed));
    assert_eq!(status, 1);
    assert!(out.contains("line 3: BREAK_REASON_SEQUENCE_GAP"), "{out}");

    // The sealing checkpoint removed: the end is unsealed.
    let mut unsealed = parsed.clone();
    unsealed.pop();
    let (status, out) = verify_file(&rejoin(&unsealed));
    assert_eq!(status, 1);
    assert!(out.contains("line 7: UNSEALED"), "{out}");

    // A checkpoint signature damaged.
    let mut forged = parsed.clone();
    forged[5]["checkpoint"]["signedPayload"] = forged[5]["checkpoint"]["signedPayload"]
        .as_str()
        .unwrap()
        .replace(&forged[5]["checkpoint"]["headHash"].as_str().unwrap()[..4], "0000")
        .into();
    let (status, out) = verify_file(&rejoin(&forged));
    assert_eq!(status, 1);
    assert!(out.contains("line 6: BREAK_REASON_CHECKPOINT_SIGNATURE_INVALID"), "{out}");

    // Not JSON at all.
    let (status, out) = verify_file(&format!("{}{{not json\n", rejoin(&parsed[..2])));
    assert_eq!(status, 1);
    assert!(out.contains("line 3: MALFORMED"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_from_a_time_starts_at_a_checkpoint_and_verifies() {
    let env = env(2).await;
    let entity = Uuid::new_v4();
    append(&env.store, (0..3).map(|_| event(entity, "crm.organizations.update")).collect()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let since = chrono::Utc::now();
    append(&env.store, (0..2).map(|_| event(entity, "crm.organizations.update")).collect()).await.unwrap();
    let text = export_text(&env, &[entity], Some(since)).await;
    let parsed = lines(&text);
    // Anchored on the checkpoint of the first batch (event 3), then events 4 and 5.
    assert_eq!(parsed[1]["checkpoint"]["sequence"], "3");
    assert_eq!(parsed[2]["event"]["sequence"], "4");
    assert_eq!(parsed.len(), 5, "header, anchor, two events, their checkpoint");
    let (status, out) = verify_file(&text);
    assert_eq!(status, 0, "{out}");
}
