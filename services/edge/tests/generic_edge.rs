//! The edge is generic: the test-only `socle.example.v1` contract, unknown
//! to the edge's code, is served on REST, gRPC-web, native gRPC and OpenAPI
//! from its descriptors alone; every bad input is a 4xx problem+json.

use prost::Message;
use serde_json::{Value, json};
use socle_server::ServerSettings;
use socle_testkit::{example::spawn_example, grpc_web, spawn_edge};
use socle_testproto::socle::example::v1::{
    GetWidgetRequest, GetWidgetResponse, WidgetState, example_service_client::ExampleServiceClient,
};

struct Setup {
    _example: socle_testkit::example::RunningExample,
    edge: socle_testkit::RunningEdge,
    http: reqwest::Client,
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

async fn setup_with(adjust: impl FnOnce(&mut socle_edge::EdgeConfig)) -> Setup {
    let example = spawn_example(ServerSettings::default()).await.expect("example server");
    let mut config = socle_edge::EdgeConfig::default();
    config.upstreams.insert("socle.example.v1".into(), example.url());
    config.server.max_body_bytes = 4096;
    config.cors.allowed_origins = vec!["https://console.example".into()];
    adjust(&mut config);
    let edge = spawn_edge(socle_testproto::descriptor_pool(), config).await.expect("edge");
    Setup { _example: example, edge, http: reqwest::Client::new() }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.edge.url())
    }

    async fn problem(&self, response: reqwest::Response, status: u16) -> Value {
        assert_eq!(response.status().as_u16(), status, "unexpected status");
        assert_eq!(response.headers()["content-type"].to_str().unwrap(), "application/problem+json");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["status"], status);
        problem
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rest_get_binds_path_and_query_with_proto3_json_mapping() {
    let s = setup().await;
    let response =
        s.http
            .get(s.url(
                "/api/v1/widgets/w%201?revision=9007199254740993&state=WIDGET_STATE_READY&tags=a&tags=b&verbose=true",
            ))
            .send()
            .await
            .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let widget = &body["widget"];
    assert_eq!(widget["id"], "w 1");
    // int64 as a string, beyond the f64-safe range.
    assert_eq!(widget["serialNumber"], "9007199254740993");
    assert_eq!(widget["state"], "WIDGET_STATE_READY");
    assert_eq!(widget["tags"], json!(["a", "b"]));
    assert_eq!(widget["displayName"], "verbose");
    assert_eq!(widget["createTime"], "2026-01-02T03:04:05Z");
}

#[tokio::test(flavor = "multi_thread")]
async fn rest_post_body_and_custom_verb_and_int64_path_variable() {
    let s = setup().await;
    let created: Value = s
        .http
        .post(s.url("/api/v1/widgets"))
        .json(&json!({ "requestId": "r1", "widget": { "displayName": "Lyon", "serialNumber": "12", "state": "WIDGET_STATE_DRAFT" } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["widget"]["id"], "w-r1");
    assert_eq!(created["widget"]["serialNumber"], "12");
    assert_eq!(created["widget"]["state"], "WIDGET_STATE_DRAFT");

    let polished: Value = s
        .http
        .post(s.url("/api/v1/widgets/w-r1:polish"))
        .json(&json!({ "intensity": 7 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(polished["widget"]["id"], "w-r1");
    assert_eq!(polished["widget"]["serialNumber"], "7");

    let revision: Value =
        s.http.get(s.url("/api/v1/widgets/w-r1/revisions/42")).send().await.unwrap().json().await.unwrap();
    assert_eq!(revision["widget"]["serialNumber"], "42");
}

#[tokio::test(flavor = "multi_thread")]
async fn service_errors_keep_their_code_reason_and_violations() {
    let s = setup().await;
    let invalid = s
        .http
        .post(s.url("/api/v1/widgets"))
        .header("x-request-id", "req-42")
        .json(&json!({ "requestId": "r2", "widget": { "displayName": "  " } }))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.headers()["x-request-id"], "req-42");
    let problem = s.problem(invalid, 400).await;
    assert_eq!(problem["code"], "INVALID_ARGUMENT");
    assert_eq!(problem["requestId"], "req-42");
    assert_eq!(problem["violations"], json!([{ "field": "widget.displayName", "description": "must not be empty" }]));

    let stale = s
        .http
        .patch(s.url("/api/v1/widgets/w1"))
        .json(&json!({ "widget": { "displayName": "x" }, "updateMask": "displayName", "etag": "v0" }))
        .send()
        .await
        .unwrap();
    let problem = s.problem(stale, 412).await;
    assert_eq!(problem["code"], "ABORTED");
    assert_eq!(problem["reason"], "ETAG_MISMATCH");

    let fresh: Value = s
        .http
        .patch(s.url("/api/v1/widgets/w1"))
        .json(&json!({ "widget": { "displayName": "x" }, "updateMask": "displayName", "etag": "v1" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fresh["widget"]["etag"], "v2");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_are_4xx_problems_never_5xx() {
    let s = setup().await;
    let post = |path: &str, body: &'static str, content_type: &'static str| {
        s.http.post(s.url(path)).header("content-type", content_type).body(body)
    };

    let malformed = post("/api/v1/widgets", "{\"widget\": {", "application/json").send().await.unwrap();
    let problem = s.problem(malformed, 400).await;
    assert!(problem["detail"].as_str().unwrap().contains("malformed JSON"), "{problem}");

    let unknown = post("/api/v1/widgets", r#"{"widget": {"colour": "red"}}"#, "application/json").send().await.unwrap();
    let problem = s.problem(unknown, 400).await;
    assert!(problem["detail"].as_str().unwrap().contains("colour"), "{problem}");

    let wrong_type =
        post("/api/v1/widgets", r#"{"widget": {"serialNumber": {"a": 1}}}"#, "application/json").send().await.unwrap();
    s.problem(wrong_type, 400).await;

    let wrong_enum = post("/api/v1/widgets", r#"{"widget": {"state": "WIDGET_STATE_SHINY"}}"#, "application/json")
        .send()
        .await
        .unwrap();
    s.problem(wrong_enum, 400).await;

    let not_json = post("/api/v1/widgets", "displayName=x", "application/x-www-form-urlencoded").send().await.unwrap();
    let problem = s.problem(not_json, 415).await;
    assert_eq!(problem["reason"], "UNSUPPORTED_MEDIA_TYPE");

    let bad_path = s.http.get(s.url("/api/v1/widgets/w1/revisions/twelve")).send().await.unwrap();
    let problem = s.problem(bad_path, 400).await;
    assert_eq!(problem["violations"][0]["field"], "revision");

    let bad_query = s.http.get(s.url("/api/v1/widgets/w1?revision=1.5")).send().await.unwrap();
    let problem = s.problem(bad_query, 400).await;
    assert_eq!(problem["violations"][0]["field"], "revision");

    let unknown_query = s.http.get(s.url("/api/v1/widgets/w1?colour=red")).send().await.unwrap();
    let problem = s.problem(unknown_query, 400).await;
    assert_eq!(problem["violations"][0]["field"], "colour");

    let big = format!(r#"{{"widget": {{"displayName": "{}"}}}}"#, "x".repeat(5000));
    let oversized = s
        .http
        .post(s.url("/api/v1/widgets"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let problem = s.problem(oversized, 413).await;
    assert_eq!(problem["reason"], "PAYLOAD_TOO_LARGE");

    let no_route = s.http.get(s.url("/api/v1/gadgets")).send().await.unwrap();
    s.problem(no_route, 404).await;

    let wrong_verb = s.http.delete(s.url("/api/v1/widgets")).send().await.unwrap();
    let problem = s.problem(wrong_verb, 405).await;
    assert_eq!(problem["reason"], "METHOD_NOT_ALLOWED");

    let body_on_get = s
        .http
        .get(s.url("/api/v1/widgets/w1"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    s.problem(body_on_get, 400).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_rpc_without_access_rule_is_refused_on_every_protocol() {
    let s = setup().await;
    let rest = s.http.post(s.url("/api/v1/forgotten")).json(&json!({})).send().await.unwrap();
    let problem = s.problem(rest, 403).await;
    assert_eq!(problem["reason"], "ACCESS_RULE_MISSING");

    let web = grpc_web::unary(&s.edge.url(), "/socle.example.v1.ExampleService/ForgottenRule", &[], &[]).await.unwrap();
    assert_eq!(web.grpc_status, Some(tonic::Code::PermissionDenied as i32));
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_web_and_native_grpc_reach_the_same_rpc_through_the_edge() {
    let s = setup().await;
    let request = GetWidgetRequest {
        widget_id: "w9".into(),
        revision: 3,
        state: WidgetState::Draft as i32,
        ..Default::default()
    };
    let web = grpc_web::unary(
        &s.edge.url(),
        "/socle.example.v1.ExampleService/GetWidget",
        &request.encode_to_vec(),
        &[("origin", "https://console.example")],
    )
    .await
    .unwrap();
    assert_eq!(web.http_status, 200);
    assert_eq!(web.grpc_status, Some(0), "{web:?}");
    let reply = GetWidgetResponse::decode(web.message.expect("a message")).unwrap();
    assert_eq!(reply.widget.unwrap().serial_number, 3);

    let channel = tonic::transport::Endpoint::from_shared(s.edge.url()).unwrap().connect().await.unwrap();
    let mut client = ExampleServiceClient::new(channel);
    let reply = client.get_widget(request).await.unwrap().into_inner();
    let widget = reply.widget.unwrap();
    assert_eq!(widget.id, "w9");
    assert_eq!(widget.state, WidgetState::Draft as i32);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_streaming_is_json_lines_on_rest() {
    let s = setup().await;
    let response = s.http.get(s.url("/api/v1/widget-stream?count=3")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["widget"]["id"], "w2");
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_is_generated_from_the_descriptors() {
    let s = setup().await;
    let doc: Value = s.http.get(s.url("/api/v1/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let get = &doc["paths"]["/api/v1/widgets/{widgetId}"]["get"];
    assert_eq!(get["x-socle-permission"], "example.widgets.read");
    assert_eq!(get["summary"], "Reads a widget. Path parameter + query parameters.");
    let params: Vec<&str> = get["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(params, ["widgetId", "revision", "state", "tags", "verbose"]);
    assert!(doc["paths"]["/api/v1/widgets/{widgetId}:polish"]["post"].is_object());
    let widget = &doc["components"]["schemas"]["socle.example.v1.Widget"]["properties"];
    assert_eq!(widget["serialNumber"]["type"], "string");
    assert_eq!(widget["state"]["enum"][2], "WIDGET_STATE_READY");
    assert_eq!(widget["createTime"]["format"], "date-time");
    // Health, configured as an extra rule, is public.
    assert_eq!(doc["paths"]["/api/v1/health"]["get"]["security"], json!([]));

    let page = s.http.get(s.url("/api/v1/docs")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("/api/v1/widgets/{widgetId}:polish"));
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_preflight_allows_configured_origins_only() {
    let s = setup().await;
    let preflight = |origin: &'static str| {
        s.http
            .request(reqwest::Method::OPTIONS, s.url("/api/v1/widgets"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,authorization")
            .send()
    };
    let allowed = preflight("https://console.example").await.unwrap();
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://console.example");
    let refused = preflight("https://evil.example").await.unwrap();
    assert!(refused.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upstream_is_a_504_problem() {
    let s = setup_with(|c| c.server.request_timeout_ms = 300).await;
    let slow = s.http.post(s.url("/api/v1/sleep")).json(&json!({ "millis": 3000 })).send().await.unwrap();
    let problem = s.problem(slow, 504).await;
    assert_eq!(problem["code"], "DEADLINE_EXCEEDED");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_is_a_503_problem_without_internal_details() {
    let s = setup_with(|c| {
        c.upstreams.insert("socle.example.v1".into(), "http://127.0.0.1:9".into());
    })
    .await;
    let response = s.http.get(s.url("/api/v1/widgets/w1")).send().await.unwrap();
    let problem = s.problem(response, 503).await;
    assert!(!problem["detail"].as_str().unwrap().contains("127.0.0.1"), "{problem}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_rpc_appears_on_rest_grpc_web_and_openapi_without_edge_code() {
    // `GetWidgetRevision` exists only in the test contract: nothing in the
    // edge names it, yet it is routed on every protocol and documented.
    use socle_testproto::socle::example::v1::{GetWidgetRevisionRequest, GetWidgetRevisionResponse};
    let s = setup().await;
    let rest: Value = s.http.get(s.url("/api/v1/widgets/w7/revisions/5")).send().await.unwrap().json().await.unwrap();
    assert_eq!(rest["widget"]["id"], "w7");
    assert_eq!(rest["widget"]["serialNumber"], "5");

    let request = GetWidgetRevisionRequest { widget_id: "w7".into(), revision: 5 };
    let web = grpc_web::unary(
        &s.edge.url(),
        "/socle.example.v1.ExampleService/GetWidgetRevision",
        &request.encode_to_vec(),
        &[],
    )
    .await
    .unwrap();
    let reply = GetWidgetRevisionResponse::decode(web.message.expect("a message")).unwrap();
    assert_eq!(reply.widget.unwrap().serial_number, 5);

    let doc: Value = s.http.get(s.url("/api/v1/openapi.json")).send().await.unwrap().json().await.unwrap();
    let operation = &doc["paths"]["/api/v1/widgets/{widgetId}/revisions/{revision}"]["get"];
    assert_eq!(operation["operationId"], "ExampleService_GetWidgetRevision");
    assert_eq!(operation["parameters"][1]["schema"]["format"], "int64");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_id_trace_context_and_acting_entity_reach_the_service() {
    let s = setup().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let rest: Value = s
        .http
        .get(s.url("/api/v1/inspect"))
        .header("x-request-id", "rest-1")
        .header("traceparent", traceparent)
        .header("x-socle-entity", "branch-a")
        .header("x-forwarded-for", "203.0.113.66")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest["requestId"], "rest-1");
    assert_eq!(rest["actingEntity"], "branch-a");
    assert_eq!(rest["clientAddress"], "127.0.0.1", "the edge states the client address, whatever the client claims");
    assert!(rest["traceparent"].as_str().unwrap().contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{rest}");

    use socle_testproto::socle::example::v1::{InspectCallRequest, InspectCallResponse};
    let web = grpc_web::unary(
        &s.edge.url(),
        "/socle.example.v1.ExampleService/InspectCall",
        &InspectCallRequest {}.encode_to_vec(),
        &[("x-request-id", "web-1"), ("traceparent", traceparent), ("x-forwarded-for", "203.0.113.66")],
    )
    .await
    .unwrap();
    let reply = InspectCallResponse::decode(web.message.unwrap()).unwrap();
    assert_eq!(reply.request_id, "web-1");
    assert_eq!(reply.client_address, "127.0.0.1");
    assert!(reply.traceparent.contains("4bf92f3577b34da6a3ce929d0e0e4736"));

    // Without an id, the edge mints one and the service sees the same.
    let response = s.http.get(s.url("/api/v1/inspect")).send().await.unwrap();
    let minted = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["requestId"], minted);
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_stream_the_raw_body_and_downloads_stream_raw_bytes() {
    let s = setup().await;
    let body = vec![b'a'; 3 * 1024 * 1024 + 10];
    let uploaded: Value = s
        .http
        .post(s.url("/api/v1/widgets/w1/file?filename=membres.csv"))
        .header("content-type", "text/csv")
        .body(body.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(uploaded["widgetId"], "w1");
    assert_eq!(uploaded["filename"], "membres.csv");
    assert_eq!(uploaded["byteCount"], (body.len()).to_string());
    assert!(uploaded["messageCount"].as_i64().unwrap() >= 4, "at most 1 MiB per message: {uploaded}");
    assert!(socle_testkit::example::upload_completed("w1"));

    let download = s.http.get(s.url("/api/v1/widgets/w1/file?size=200000")).send().await.unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(download.headers()["content-disposition"], "attachment; filename=\"w1.csv\"");
    assert_eq!(download.bytes().await.unwrap().len(), 200_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_over_the_limit_is_413_and_never_completes_upstream() {
    let s = setup_with(|c| c.server.max_upload_bytes = 1024 * 1024).await;
    // Streamed without a length, so the edge finds out while forwarding.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..4).map(|_| Ok(vec![b'z'; 512 * 1024])).collect();
    let response = s
        .http
        .post(s.url("/api/v1/widgets/too-big/file"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let problem = s.problem(response, 413).await;
    assert_eq!(problem["reason"], "PAYLOAD_TOO_LARGE");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!socle_testkit::example::upload_completed("too-big"), "a cut upload must not complete");
}
