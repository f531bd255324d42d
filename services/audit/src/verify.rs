//! Chain verification shared by `VerifyChain` (events read from the
//! database) and the offline verifier (events read from an export): the same
//! checks, in the same order, with the same reasons.

// A break is the rare, final outcome of a verification: returning the
// contract's `ChainBreak` by value costs nothing that matters.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;

use socle_proto::socle::audit::v1::{AuditEvent, BreakReason, ChainBreak, Checkpoint};

use crate::{canonical, keys};

/// The first line of a checkpoint's signed payload.
pub const CHECKPOINT_FORMAT: &str = "socle-audit-checkpoint/v1";

/// The bytes a checkpoint signs.
pub fn checkpoint_payload(entity: &str, sequence: i64, head_hash: &str, create_time: &str) -> String {
    format!("{CHECKPOINT_FORMAT}\n{entity}\n{sequence}\n{head_hash}\n{create_time}")
}

/// Public checkpoint keys by id.
pub type PublicKeys = HashMap<String, Vec<u8>>;

fn broken(sequence: i64, reason: BreakReason, detail: impl Into<String>) -> ChainBreak {
    ChainBreak { sequence, reason: reason as i32, detail: detail.into(), ..Default::default() }
}

/// Checks a checkpoint's signature and that its fields are the signed ones.
pub fn check_checkpoint_signature(checkpoint: &Checkpoint, keys: &PublicKeys) -> Result<(), ChainBreak> {
    let invalid = |detail: &str| ChainBreak {
        checkpoint_id: checkpoint.id.clone(),
        expected_hash: checkpoint.head_hash.clone(),
        ..broken(checkpoint.sequence, BreakReason::CheckpointSignatureInvalid, detail)
    };
    if checkpoint.algorithm != keys::ALGORITHM {
        return Err(invalid("unknown signature algorithm"));
    }
    let Some(public) = keys.get(&checkpoint.signing_key_id) else {
        return Err(invalid("signed by an unknown key"));
    };
    if !keys::verify_signature(public, checkpoint.signed_payload.as_bytes(), &checkpoint.signature) {
        return Err(invalid("the signature does not verify with its key"));
    }
    let create_time = checkpoint.create_time.as_ref().map(canonical::format_time).transpose().ok().flatten();
    let expected = checkpoint_payload(
        &checkpoint.entity_id,
        checkpoint.sequence,
        &checkpoint.head_hash,
        create_time.as_deref().unwrap_or_default(),
    );
    if expected != checkpoint.signed_payload {
        return Err(invalid("the checkpoint's fields differ from its signed payload"));
    }
    Ok(())
}

/// Verifies one entity's chain, one record at a time, in chain order.
pub struct ChainVerifier<'k> {
    keys: &'k PublicKeys,
    next_sequence: i64,
    last_hash: String,
    last_event_id: String,
    /// Events verified so far.
    pub verified_events: i64,
    /// Checkpoints verified so far.
    pub verified_checkpoints: i32,
}

impl<'k> ChainVerifier<'k> {
    /// Starts before `start_sequence`, whose predecessor has `prev_hash`.
    pub fn new(keys: &'k PublicKeys, start_sequence: i64, prev_hash: String) -> Self {
        ChainVerifier {
            keys,
            next_sequence: start_sequence,
            last_hash: prev_hash,
            last_event_id: String::new(),
            verified_events: 0,
            verified_checkpoints: 0,
        }
    }

    /// The sequence the next event must have.
    pub fn next_sequence(&self) -> i64 {
        self.next_sequence
    }

    /// The hash of the last verified event (or the anchor).
    pub fn head_hash(&self) -> &str {
        &self.last_hash
    }

    /// Verifies the next event.
    pub fn event(&mut self, event: &AuditEvent) -> Result<(), ChainBreak> {
        if event.sequence != self.next_sequence {
            let detail = if event.sequence > self.next_sequence {
                format!("events {} to {} are missing", self.next_sequence, event.sequence - 1)
            } else {
                format!("event {} appears after event {}", event.sequence, self.next_sequence - 1)
            };
            return Err(broken(self.next_sequence, BreakReason::SequenceGap, detail));
        }
        let recomputed = canonical::event_hash(event);
        if recomputed.as_deref().ok() != Some(event.hash.as_str()) {
            let detail = match &recomputed {
                Ok(_) => "the stored hash is not the hash of the event's content: the event was modified".to_owned(),
                Err(e) => format!("the event cannot be encoded: {e}"),
            };
            return Err(ChainBreak {
                event_id: event.id.clone(),
                expected_hash: recomputed.unwrap_or_default(),
                actual_hash: event.hash.clone(),
                ..broken(event.sequence, BreakReason::HashMismatch, detail)
            });
        }
        if event.prev_hash != self.last_hash {
            return Err(ChainBreak {
                event_id: event.id.clone(),
                expected_hash: self.last_hash.clone(),
                actual_hash: event.prev_hash.clone(),
                ..broken(
                    event.sequence,
                    BreakReason::PrevHashMismatch,
                    "prev_hash is not the previous event's hash: an event was inserted, removed or rewritten before it",
                )
            });
        }
        self.next_sequence += 1;
        self.last_hash = event.hash.clone();
        self.last_event_id = event.id.clone();
        self.verified_events += 1;
        Ok(())
    }

    /// Verifies a checkpoint sealing the last verified event.
    pub fn checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), ChainBreak> {
        check_checkpoint_signature(checkpoint, self.keys)?;
        let mismatch = |detail: String| ChainBreak {
            event_id: self.last_event_id.clone(),
            checkpoint_id: checkpoint.id.clone(),
            expected_hash: checkpoint.head_hash.clone(),
            actual_hash: self.last_hash.clone(),
            ..broken(checkpoint.sequence, BreakReason::CheckpointMismatch, detail)
        };
        if checkpoint.sequence != self.next_sequence - 1 {
            return Err(mismatch(format!(
                "the checkpoint seals event {} but the chain is at event {}",
                checkpoint.sequence,
                self.next_sequence - 1
            )));
        }
        if checkpoint.head_hash != self.last_hash {
            return Err(mismatch(
                "the event's hash differs from the one the checkpoint sealed: the chain was rewritten".into(),
            ));
        }
        self.verified_checkpoints += 1;
        Ok(())
    }

    /// Starts from a checkpoint (an export that does not begin at event 1):
    /// its signature is checked and its head becomes the anchor.
    pub fn anchor(&mut self, checkpoint: &Checkpoint) -> Result<(), ChainBreak> {
        check_checkpoint_signature(checkpoint, self.keys)?;
        self.next_sequence = checkpoint.sequence + 1;
        self.last_hash = checkpoint.head_hash.clone();
        self.verified_checkpoints += 1;
        Ok(())
    }
}
