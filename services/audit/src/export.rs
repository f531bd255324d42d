//! JSON Lines exports and their offline verification.
//!
//! Each line is the proto3 JSON of an `AuditExportLine`: a header (format,
//! entities, time range, signing keys), then each entity's events in chain
//! order interleaved with the checkpoints that seal them, starting at event
//! 1 or at an anchoring checkpoint, and ending with a checkpoint covering
//! the last exported event. [`verify_export`] checks such a file with no
//! database: `socle-audit verify FILE`.

use std::{collections::HashMap, io::BufRead};

use chrono::{DateTime, Utc};
use prost::Message;
use prost_reflect::{DynamicMessage, SerializeOptions};
use socle_errors::{Code, Error};
use socle_proto::socle::audit::v1::{
    AuditExportHeader, AuditExportLine, BreakReason, ChainBreak, audit_export_line::Record,
};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{
    canonical::GENESIS_HASH,
    store::Store,
    verify::{ChainVerifier, PublicKeys, check_checkpoint_signature},
};

/// The header's format identifier.
pub const FORMAT: &str = "socle-audit-export/v1";

/// Events read per query while exporting.
const PAGE: i64 = 1000;

fn descriptor() -> prost_reflect::MessageDescriptor {
    socle_proto::descriptor_pool().get_message_by_name("socle.audit.v1.AuditExportLine").expect("AuditExportLine")
}

/// One line (with its newline): the proto3 JSON of the record.
pub fn line(record: Record) -> Result<String, Error> {
    let bytes = AuditExportLine { record: Some(record) }.encode_to_vec();
    let message = DynamicMessage::decode(descriptor(), bytes.as_slice()).map_err(Error::internal)?;
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::new(&mut out);
    message.serialize_with_options(&mut serializer, &SerializeOptions::new()).map_err(Error::internal)?;
    let mut text = String::from_utf8(out).map_err(Error::internal)?;
    text.push('\n');
    Ok(text)
}

/// Parses one line.
pub fn parse_line(text: &str) -> Result<AuditExportLine, String> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let message = DynamicMessage::deserialize(descriptor(), &mut deserializer)
        .map_err(|e| format!("not an AuditExportLine in proto3 JSON: {e}"))?;
    deserializer.end().map_err(|e| format!("trailing characters: {e}"))?;
    message.transcode_to::<AuditExportLine>().map_err(|e| format!("not an AuditExportLine: {e}"))
}

/// Writes an export of `entities` to `sink`, one line per message. The
/// chains are verified on the way; a broken chain stops the export with
/// `FAILED_PRECONDITION` naming the first break (run `VerifyChain` for the details).
pub async fn export(
    store: &Store,
    entities: &[Uuid],
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    sink: &mpsc::Sender<String>,
) -> Result<(), Error> {
    let send =
        |text: String| async move { sink.send(text).await.map_err(|_| Error::unavailable("the client went away")) };
    let signing_keys = store.signing_keys().await?;
    let keys: PublicKeys = signing_keys.iter().map(|k| (k.id.clone(), k.public_key.clone())).collect();
    send(line(Record::Header(AuditExportHeader {
        format: FORMAT.into(),
        entity_ids: entities.iter().map(Uuid::to_string).collect(),
        start_time: start.map(socle_api::timestamp),
        end_time: end.map(socle_api::timestamp),
        signing_keys,
        export_time: Some(socle_api::timestamp(Utc::now())),
    }))?)
    .await?;
    for &entity in entities {
        let Some((first, last, anchor)) = store.export_bounds(entity, start, end).await? else { continue };
        let mut verifier = ChainVerifier::new(&keys, 1, GENESIS_HASH.to_owned());
        let broken = |b: ChainBreak| {
            Error::new(
                Code::FailedPrecondition,
                format!(
                    "the chain of entity {entity} does not verify at event {} ({}): {}",
                    b.sequence,
                    BreakReason::try_from(b.reason).map(|r| r.as_str_name()).unwrap_or("?"),
                    b.detail
                ),
            )
        };
        if let Some(anchor) = anchor {
            verifier.anchor(&anchor).map_err(broken)?;
            send(line(Record::Checkpoint(anchor))?).await?;
        }
        let mut sealed_at = 0;
        let mut from = first;
        while from <= last {
            let to = last.min(from + PAGE - 1);
            let events = store.chain_events(entity, from, to).await?;
            let checkpoints = store.checkpoints_between(entity, from, to).await?;
            let mut pending = checkpoints.into_iter().peekable();
            for event in events {
                verifier.event(&event).map_err(broken)?;
                let sequence = event.sequence;
                send(line(Record::Event(event))?).await?;
                while let Some(checkpoint) = pending.next_if(|c| c.sequence <= sequence) {
                    verifier.checkpoint(&checkpoint).map_err(broken)?;
                    sealed_at = checkpoint.sequence;
                    send(line(Record::Checkpoint(checkpoint))?).await?;
                }
            }
            from = to + 1;
        }
        if verifier.next_sequence() <= last {
            return Err(broken(ChainBreak {
                sequence: verifier.next_sequence(),
                reason: BreakReason::SequenceGap as i32,
                detail: "events are missing".into(),
                ..Default::default()
            }));
        }
        if sealed_at != last {
            let checkpoint = store.checkpoint_at(entity, last, verifier.head_hash().to_owned()).await?;
            send(line(Record::Checkpoint(checkpoint))?).await?;
        }
    }
    Ok(())
}

/// What a verified export holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Entities with events.
    pub entities: usize,
    /// Events verified.
    pub events: i64,
    /// Checkpoints verified (anchors included).
    pub checkpoints: i64,
}

/// Where and why an export does not verify.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    /// 1-based line number.
    pub line: usize,
    /// A `BreakReason` name, or `MALFORMED` / `UNSEALED`.
    pub reason: String,
    /// Explanation.
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.reason, self.detail)
    }
}

struct Chain<'k> {
    verifier: ChainVerifier<'k>,
    started: bool,
    sealed: bool,
    last_line: usize,
}

/// Verifies an export without any database.
pub fn verify_export(reader: impl BufRead) -> Result<Report, Failure> {
    let malformed = |line: usize, detail: String| Failure { line, reason: "MALFORMED".into(), detail };
    let from_break = |line: usize, b: ChainBreak| Failure {
        line,
        reason: BreakReason::try_from(b.reason).map(|r| r.as_str_name().to_owned()).unwrap_or_default(),
        detail: if b.event_id.is_empty() {
            format!("at event {}: {}", b.sequence, b.detail)
        } else {
            format!("event {} ({}): {}", b.sequence, b.event_id, b.detail)
        },
    };
    let mut lines = reader.lines().enumerate().map(|(i, l)| (i + 1, l));
    let header = match lines.next() {
        Some((n, Ok(text))) => match parse_line(&text).map_err(|e| malformed(n, e))?.record {
            Some(Record::Header(header)) => header,
            _ => return Err(malformed(n, "the first line must be the header".into())),
        },
        Some((n, Err(e))) => return Err(malformed(n, e.to_string())),
        None => return Err(malformed(1, "the file is empty".into())),
    };
    if header.format != FORMAT {
        return Err(malformed(1, format!("unknown format `{}`", header.format)));
    }
    let keys: PublicKeys = header.signing_keys.iter().map(|k| (k.id.clone(), k.public_key.clone())).collect();
    let mut chains: HashMap<String, Chain<'_>> = header
        .entity_ids
        .iter()
        .map(|e| {
            let verifier = ChainVerifier::new(&keys, 1, GENESIS_HASH.to_owned());
            (e.clone(), Chain { verifier, started: false, sealed: false, last_line: 0 })
        })
        .collect();
    let mut report = Report::default();
    for (n, text) in lines {
        let text = text.map_err(|e| malformed(n, e.to_string()))?;
        if text.trim().is_empty() {
            continue;
        }
        match parse_line(&text).map_err(|e| malformed(n, e))?.record {
            Some(Record::Event(event)) => {
                let chain = chains
                    .get_mut(&event.entity_id)
                    .ok_or_else(|| malformed(n, format!("entity {} is not in the header", event.entity_id)))?;
                chain.verifier.event(&event).map_err(|b| from_break(n, b))?;
                (chain.started, chain.sealed, chain.last_line) = (true, false, n);
                report.events += 1;
            }
            Some(Record::Checkpoint(checkpoint)) => {
                let chain = chains
                    .get_mut(&checkpoint.entity_id)
                    .ok_or_else(|| malformed(n, format!("entity {} is not in the header", checkpoint.entity_id)))?;
                if chain.started {
                    chain.verifier.checkpoint(&checkpoint).map_err(|b| from_break(n, b))?;
                } else {
                    check_checkpoint_signature(&checkpoint, &keys).map_err(|b| from_break(n, b))?;
                    chain.verifier.anchor(&checkpoint).map_err(|b| from_break(n, b))?;
                    chain.started = true;
                }
                (chain.sealed, chain.last_line) = (true, n);
                report.checkpoints += 1;
            }
            Some(Record::Header(_)) => return Err(malformed(n, "a second header".into())),
            None => return Err(malformed(n, "an empty record".into())),
        }
    }
    let mut unsealed: Vec<(&String, &Chain<'_>)> = chains.iter().filter(|(_, c)| c.started && !c.sealed).collect();
    unsealed.sort_by_key(|(_, c)| c.last_line);
    if let Some((entity, chain)) = unsealed.first() {
        return Err(Failure {
            line: chain.last_line,
            reason: "UNSEALED".into(),
            detail: format!("the last events of entity {entity} are not sealed by a checkpoint"),
        });
    }
    report.entities = chains.values().filter(|c| c.started).count();
    Ok(report)
}
