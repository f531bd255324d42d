//! End to end: every service and the edge in one process, each service with
//! its own freshly migrated PostgreSQL database. A readiness call reaches
//! every service through REST, gRPC-web and native gRPC.

use prost::Message;
use socle_testkit::{Platform, Service, grpc_web};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_client::HealthClient,
};

/// One gRPC service of each backend, as named in the contracts.
fn first_service_of(package: &str) -> String {
    socle_proto::descriptor_pool()
        .services()
        .find(|s| s.package_name() == package)
        .map(|s| s.full_name().to_owned())
        .unwrap_or_else(|| panic!("no service in {package}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_reaches_every_service_through_rest_grpc_web_and_grpc() {
    let platform = Platform::start().await.expect("platform starts");
    let edge = platform.edge_url();
    let http = reqwest::Client::new();
    let channel = tonic::transport::Endpoint::from_shared(edge.clone()).unwrap().connect().await.unwrap();
    let mut grpc = HealthClient::new(channel);

    for service in Service::ALL {
        // Every gRPC service of the backend, not only the first, is SERVING.
        let names: Vec<String> = socle_proto::descriptor_pool()
            .services()
            .filter(|s| s.package_name() == service.package())
            .map(|s| s.full_name().to_owned())
            .collect();
        assert!(!names.is_empty());
        for name in names {
            let rest: serde_json::Value =
                http.get(format!("{edge}/api/v1/health?service={name}")).send().await.unwrap().json().await.unwrap();
            assert_eq!(rest["status"], "SERVING", "REST readiness of {name}: {rest}");

            let request = HealthCheckRequest { service: name.clone() };
            let web =
                grpc_web::unary(&edge, "/grpc.health.v1.Health/Check", &request.encode_to_vec(), &[]).await.unwrap();
            assert_eq!(web.grpc_status, Some(0), "gRPC-web readiness of {name}: {web:?}");
            let reply = HealthCheckResponse::decode(web.message.unwrap()).unwrap();
            assert_eq!(reply.status, ServingStatus::Serving as i32);

            let reply = grpc.check(request).await.unwrap().into_inner();
            assert_eq!(reply.status, ServingStatus::Serving as i32, "gRPC readiness of {name}");
        }
    }

    // A service that is down is reported NOT_SERVING, not as an edge error.
    let crm = first_service_of("socle.crm.v1");
    let mut platform = platform;
    let running = platform.services.remove(&Service::Crm).unwrap();
    running.stop().await.unwrap();
    let rest: serde_json::Value =
        http.get(format!("{edge}/api/v1/health?service={crm}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(rest["status"], "NOT_SERVING");
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_rpcs_not_built_yet_answer_unimplemented_through_every_protocol() {
    let platform = Platform::start().await.expect("platform starts");
    let edge = platform.edge_url();
    // A REST route generated from the cms contract reaches the cms service,
    // whose RPCs are not built yet.
    let response = reqwest::Client::new()
        .post(format!("{edge}/api/v1/categories"))
        .json(&serde_json::json!({ "category": { "entityId": "8b7d7d0e-4b1a-4c8e-9d43-6f1f2a0f0a11" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 501);
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "UNIMPLEMENTED");

    let web = grpc_web::unary(&edge, "/socle.cms.v1.ContentService/GetContent", &[], &[]).await.unwrap();
    assert_eq!(web.grpc_status, Some(tonic::Code::Unimplemented as i32));

    // Every REST route of the contracts is in the OpenAPI document.
    let doc: serde_json::Value =
        reqwest::get(format!("{edge}/api/v1/openapi.json")).await.unwrap().json().await.unwrap();
    let operations: usize = doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
    let rpcs_with_http = socle_proto::descriptor_pool()
        .services()
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .filter(|m| socle_proto::options::http_rule(m).is_some())
        .count();
    assert_eq!(operations, rpcs_with_http + 1, "every annotated RPC plus health");
}
