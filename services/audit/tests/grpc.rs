//! The audit service over gRPC (declared mode): append, query with page
//! tokens, verify, export as a stream, checkpoints and keys; and the role
//! the service runs with cannot change what it wrote.

mod common;

use std::io::BufReader;

use common::event;
use diesel_async::SimpleAsyncConnection;
use socle_proto::socle::audit::v1::{
    AppendEventsRequest, ChainStatus, ExportEventsRequest, GetCheckpointRequest, GetEventRequest,
    ListCheckpointsRequest, ListSigningKeysRequest, QueryEventsRequest, VerifyChainRequest,
    audit_event_service_client::AuditEventServiceClient, checkpoint_service_client::CheckpointServiceClient,
};
use socle_testkit::{Service, spawn_service};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn the_service_appends_queries_verifies_and_exports() {
    let audit = spawn_service(Service::Audit).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(audit.url()).unwrap().connect().await.unwrap();
    let mut events = AuditEventServiceClient::new(channel.clone());
    let mut checkpoints = CheckpointServiceClient::new(channel);
    let entity = Uuid::new_v4();
    let batch: Vec<_> = (0..3).map(|_| event(entity, "crm.organizations.update")).collect();
    let appended = events.append_events(AppendEventsRequest { events: batch.clone() }).await.unwrap().into_inner();
    assert_eq!(appended.results.iter().map(|r| r.sequence).collect::<Vec<_>>(), [1, 2, 3]);

    let invalid = events
        .append_events(AppendEventsRequest { events: vec![socle_proto::socle::audit::v1::AuditEvent::default()] })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);

    let mut query = QueryEventsRequest { entity_id: entity.to_string(), page_size: 2, ..Default::default() };
    let first = events.query_events(query.clone()).await.unwrap().into_inner();
    assert_eq!(first.events.len(), 2);
    assert!(!first.next_page_token.is_empty());
    query.page_token = first.next_page_token.clone();
    let second = events.query_events(query.clone()).await.unwrap().into_inner();
    assert_eq!((second.events.len(), second.next_page_token.as_str()), (1, ""));
    query.actor_id = Uuid::new_v4().to_string();
    let replayed = events.query_events(query).await.unwrap_err();
    assert_eq!(replayed.code(), tonic::Code::InvalidArgument, "a token is bound to its filters");

    let got = events.get_event(GetEventRequest { event_id: batch[1].id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.event.unwrap().hash, appended.results[1].hash);

    let verified = events
        .verify_chain(VerifyChainRequest { entity_id: entity.to_string(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((verified.status, verified.verified_event_count), (ChainStatus::Ok as i32, 3));

    let mut stream = events
        .export_events(ExportEventsRequest { entity_id: entity.to_string(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut file = Vec::new();
    let mut first_chunk = true;
    while let Some(chunk) = stream.message().await.unwrap() {
        if first_chunk {
            assert_eq!(chunk.content_type, "application/jsonl");
            assert!(chunk.filename.ends_with(".jsonl"));
            first_chunk = false;
        }
        file.extend_from_slice(&chunk.chunk);
    }
    let report = socle_audit::export::verify_export(BufReader::new(file.as_slice())).unwrap();
    assert_eq!((report.events, report.checkpoints), (3, 1));

    // The export sealed the chain: its checkpoint is listed and readable.
    let listed = checkpoints
        .list_checkpoints(ListCheckpointsRequest { entity_id: entity.to_string(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.checkpoints.len(), 1);
    let checkpoint = &listed.checkpoints[0];
    assert_eq!((checkpoint.sequence, &checkpoint.head_hash), (3, &appended.results[2].hash));
    let got = checkpoints
        .get_checkpoint(GetCheckpointRequest { checkpoint_id: checkpoint.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.checkpoint.as_ref(), Some(checkpoint));
    let keys = checkpoints.list_signing_keys(ListSigningKeysRequest::default()).await.unwrap().into_inner();
    assert_eq!(keys.signing_keys.len(), 1);
    assert_eq!(keys.signing_keys[0].id, checkpoint.signing_key_id);
    assert!(keys.signing_keys[0].retire_time.is_none());

    // The role the service runs with lost UPDATE and DELETE at start-up.
    let mut app = socle_db::admin::connect(&audit.database.app_url_with_password()).await.unwrap();
    let error = app.batch_execute("UPDATE audit_events SET action = 'crm.organizations.read'").await.unwrap_err();
    assert!(error.to_string().contains("permission denied"), "{error}");
    let error = app.batch_execute("DELETE FROM audit_checkpoints").await.unwrap_err();
    assert!(error.to_string().contains("permission denied"), "{error}");
}
