//! The shared tower stack, exercised over real gRPC on the example contract.

use std::time::Duration;

use socle_server::ServerSettings;
use socle_testkit::example::spawn_example;
use socle_testproto::socle::example::v1::{
    ForgottenRuleRequest, GetWidgetRequest, SleepRequest, example_service_client::ExampleServiceClient,
};
use tonic::transport::Channel;
use tonic_types::StatusExt;

async fn client(settings: ServerSettings) -> (socle_testkit::example::RunningExample, ExampleServiceClient<Channel>) {
    let server = spawn_example(settings).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    (server, ExampleServiceClient::new(channel))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_rpc_without_access_rule_never_reaches_its_handler() {
    let (_server, mut client) = client(ServerSettings::default()).await;
    let status = client.forgotten_rule(ForgottenRuleRequest {}).await.unwrap_err();
    // The handler would answer INTERNAL; the layer answers first.
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.get_error_details().error_info().unwrap().reason, "ACCESS_RULE_MISSING");
}

#[tokio::test(flavor = "multi_thread")]
async fn declared_rpcs_pass_and_carry_a_request_id() {
    let (_server, mut client) = client(ServerSettings::default()).await;
    let mut request = tonic::Request::new(GetWidgetRequest { widget_id: "a".into(), ..Default::default() });
    request.metadata_mut().insert("x-request-id", "abc-123".parse().unwrap());
    let response = client.get_widget(request).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "abc-123");
    // Without one, the server mints one.
    let response = client.get_widget(GetWidgetRequest::default()).await.unwrap();
    assert!(!response.metadata().get("x-request-id").unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_over_the_concurrency_limit_are_shed_not_queued() {
    let settings = ServerSettings { max_in_flight: 1, ..Default::default() };
    let (_server, client) = client(settings).await;
    let mut slow = client.clone();
    let first = tokio::spawn(async move { slow.sleep(SleepRequest { millis: 800 }).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut other = client.clone();
    let shed = other.sleep(SleepRequest { millis: 0 }).await.unwrap_err();
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted);
    assert_eq!(shed.get_error_details().error_info().unwrap().reason, "OVERLOADED");
    assert!(first.await.unwrap().is_ok(), "the call in flight completes");
    // Capacity is back once it finished.
    other.sleep(SleepRequest { millis: 0 }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_longer_than_the_server_timeout_are_deadline_exceeded() {
    let settings = ServerSettings { request_timeout_ms: 100, ..Default::default() };
    let (_server, mut client) = client(settings).await;
    let status = client.sleep(SleepRequest { millis: 2_000 }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_served_contracts() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = spawn_example(ServerSettings::default()).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(futures::stream::iter(vec![request])).await.unwrap().into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "grpc.health.v1.Health"), "{names:?}");
    assert!(names.iter().any(|n| n == "socle.example.v1.ExampleService"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("socle.crm")), "only what this server serves: {names:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_the_call_in_flight() {
    let (server, client) = client(ServerSettings::default()).await;
    let mut slow = client.clone();
    let in_flight = tokio::spawn(async move { slow.sleep(SleepRequest { millis: 500 }).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(server); // sends the shutdown signal
    assert!(in_flight.await.unwrap().is_ok(), "the in-flight call completes during the drain");
}

#[tokio::test(flavor = "multi_thread")]
async fn red_metrics_count_every_rpc_by_method_and_code() {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::{
        InMemoryMetricExporter, PeriodicReader, SdkMeterProvider, data::AggregatedMetrics,
    };

    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder().with_reader(PeriodicReader::builder(exporter.clone()).build()).build();
    let metrics = socle_telemetry::RpcMetrics::from_meter(&provider.meter("test"));
    let server =
        socle_testkit::example::spawn_example_with(ServerSettings::default(), Some(metrics), None).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut client = ExampleServiceClient::new(channel);
    client.get_widget(GetWidgetRequest::default()).await.unwrap();
    client.get_widget(GetWidgetRequest::default()).await.unwrap();
    client.forgotten_rule(ForgottenRuleRequest {}).await.unwrap_err();
    // Response bodies are finished after the client got them: let the
    // server record, then collect.
    tokio::time::sleep(Duration::from_millis(100)).await;
    provider.force_flush().unwrap();

    let mut counts = std::collections::BTreeMap::new();
    for resource in exporter.get_finished_metrics().unwrap() {
        for scope in resource.scope_metrics() {
            for metric in scope.metrics().filter(|m| m.name() == "rpc.server.requests") {
                let AggregatedMetrics::U64(opentelemetry_sdk::metrics::data::MetricData::Sum(sum)) = metric.data()
                else {
                    panic!("rpc.server.requests is a u64 sum")
                };
                for point in sum.data_points() {
                    let attr = |key: &str| {
                        point.attributes().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string()).unwrap()
                    };
                    counts.insert((attr("rpc.method"), attr("rpc.grpc.status_code")), point.value());
                }
            }
        }
    }
    assert_eq!(counts.get(&("GetWidget".into(), "OK".into())), Some(&2), "{counts:?}");
    assert_eq!(counts.get(&("ForgottenRule".into(), "PERMISSION_DENIED".into())), Some(&1), "{counts:?}");
}

/// Lets a call through only when its target entity is `branch-a`.
struct OnlyBranchA;

impl socle_server::Authorizer for OnlyBranchA {
    fn authorize<'a>(
        &'a self,
        call: socle_server::authz::CallInfo<'a>,
    ) -> futures::future::BoxFuture<'a, Result<socle_server::Principal, socle_errors::Error>> {
        Box::pin(async move {
            match call.entity.as_deref() {
                Some("branch-a") => Ok(socle_server::Principal::Anonymous),
                other => Err(socle_errors::Error::permission_denied(format!("not allowed on {other:?}"))),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_layer_reads_the_target_entity_from_the_request_and_passes_the_body_on() {
    use socle_testproto::socle::example::v1::{CreateWidgetRequest, Widget};
    let server = socle_testkit::example::spawn_example_with(
        ServerSettings::default(),
        None,
        Some(std::sync::Arc::new(OnlyBranchA)),
    )
    .await
    .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut client = ExampleServiceClient::new(channel);
    let create = |entity: &str| CreateWidgetRequest {
        request_id: "r1".into(),
        widget: Some(Widget { entity_id: entity.into(), display_name: "Atelier".into(), ..Default::default() }),
    };
    // `CreateWidget` declares `entity_field: "widget.entity_id"`.
    let created = client.create_widget(create("branch-a")).await.unwrap().into_inner();
    assert_eq!(created.widget.unwrap().display_name, "Atelier", "the handler got the whole message");
    let refused = client.create_widget(create("branch-b")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("branch-b"), "{}", refused.message());
    // No entity field on the RPC and no header: the authorizer sees none.
    let refused = client.get_widget(GetWidgetRequest::default()).await.unwrap_err();
    assert!(refused.message().contains("None"), "{}", refused.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_stream_is_authorized_on_its_first_message_and_flows_on_whatever_its_size() {
    use socle_testproto::socle::example::v1::ImportWidgetsRequest;
    let server = socle_testkit::example::spawn_example_with(
        ServerSettings::default(),
        None,
        Some(std::sync::Arc::new(OnlyBranchA)),
    )
    .await
    .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut client = ExampleServiceClient::new(channel);
    // 12 MiB in 1 MiB messages: more than the layer would ever buffer (8 MiB).
    let messages = |entity: &str| {
        let mut all = vec![ImportWidgetsRequest { entity_id: entity.into(), chunk: vec![b'a'; 1024] }];
        all.extend((0..12).map(|_| ImportWidgetsRequest { entity_id: String::new(), chunk: vec![b'b'; 1 << 20] }));
        futures::stream::iter(all)
    };
    let reply = client.import_widgets(messages("branch-a")).await.unwrap().into_inner();
    assert_eq!(reply.entity_id, "branch-a");
    assert_eq!(reply.message_count, 13, "every message reached the handler");
    assert_eq!(reply.byte_count, 1024 + 12 * (1 << 20));
    let refused = client.import_widgets(messages("branch-b")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
}
