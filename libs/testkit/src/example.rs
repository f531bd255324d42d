//! A server for the test-only `socle.example.v1` contract, hosted by the real
//! [`socle_server::ServiceHost`] (same tower stack as every service).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::stream::BoxStream;
use socle_errors::Error;
use socle_server::{DeclaredRulesOnly, ServerSettings, ServiceHost, request_id};
use socle_testproto::socle::example::v1::{example_service_server::*, *};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{Request, Response, Status};

/// Widgets whose upload stream ended normally (a cut upload must not count).
static COMPLETED_UPLOADS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Whether an upload for `widget_id` reached its handler's end.
pub fn upload_completed(widget_id: &str) -> bool {
    COMPLETED_UPLOADS.lock().expect("lock").iter().any(|w| w == widget_id)
}

/// The example implementation: echoes its inputs so tests can check the
/// transcoding of every field kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct Example;

fn fixed_time() -> prost_types::Timestamp {
    // 2026-01-02T03:04:05Z
    prost_types::Timestamp { seconds: 1_767_323_045, nanos: 0 }
}

#[tonic::async_trait]
impl ExampleService for Example {
    async fn get_widget(&self, request: Request<GetWidgetRequest>) -> Result<Response<GetWidgetResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(GetWidgetResponse {
            widget: Some(Widget {
                id: r.widget_id,
                display_name: if r.verbose { "verbose".into() } else { String::new() },
                serial_number: r.revision,
                state: r.state,
                tags: r.tags,
                create_time: Some(fixed_time()),
                ..Default::default()
            }),
        }))
    }

    async fn get_widget_revision(
        &self,
        request: Request<GetWidgetRevisionRequest>,
    ) -> Result<Response<GetWidgetRevisionResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(GetWidgetRevisionResponse {
            widget: Some(Widget { id: r.widget_id, serial_number: r.revision, ..Default::default() }),
        }))
    }

    async fn create_widget(
        &self,
        request: Request<CreateWidgetRequest>,
    ) -> Result<Response<CreateWidgetResponse>, Status> {
        let rid = request_id::of(&request).map(str::to_owned);
        let r = request.into_inner();
        let mut widget = r.widget.unwrap_or_default();
        if widget.display_name.trim().is_empty() {
            return Err(Error::invalid_field("widget.display_name", "must not be empty").into_status(rid.as_deref()));
        }
        widget.id = format!("w-{}", r.request_id);
        widget.create_time = Some(fixed_time());
        widget.etag = "v1".into();
        Ok(Response::new(CreateWidgetResponse { widget: Some(widget) }))
    }

    async fn update_widget(
        &self,
        request: Request<UpdateWidgetRequest>,
    ) -> Result<Response<UpdateWidgetResponse>, Status> {
        let rid = request_id::of(&request).map(str::to_owned);
        let r = request.into_inner();
        if r.etag != "v1" {
            return Err(Error::etag_mismatch().into_status(rid.as_deref()));
        }
        let mut widget = r.widget.unwrap_or_default();
        widget.id = r.widget_id;
        widget.etag = "v2".into();
        Ok(Response::new(UpdateWidgetResponse { widget: Some(widget) }))
    }

    async fn polish_widget(
        &self,
        request: Request<PolishWidgetRequest>,
    ) -> Result<Response<PolishWidgetResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(PolishWidgetResponse {
            widget: Some(Widget {
                id: r.widget_id,
                serial_number: i64::from(r.intensity),
                state: WidgetState::Ready as i32,
                ..Default::default()
            }),
        }))
    }

    async fn list_widget_stream(
        &self,
        request: Request<ListWidgetStreamRequest>,
    ) -> Result<Response<BoxStream<'static, Result<ListWidgetStreamResponse, Status>>>, Status> {
        let count = request.into_inner().count.max(0);
        let items = (0..count).map(|i| {
            Ok(ListWidgetStreamResponse {
                widget: Some(Widget { id: format!("w{i}"), serial_number: i64::from(i), ..Default::default() }),
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(items.collect::<Vec<_>>()))))
    }

    async fn import_widgets(
        &self,
        request: Request<tonic::Streaming<ImportWidgetsRequest>>,
    ) -> Result<Response<ImportWidgetsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut reply = ImportWidgetsResponse::default();
        while let Some(message) = stream.message().await? {
            if reply.message_count == 0 {
                reply.entity_id = message.entity_id;
            }
            reply.message_count += 1;
            reply.byte_count += message.chunk.len() as i64;
        }
        Ok(Response::new(reply))
    }

    async fn upload_widget_file(
        &self,
        request: Request<tonic::Streaming<UploadWidgetFileRequest>>,
    ) -> Result<Response<UploadWidgetFileResponse>, Status> {
        let mut stream = request.into_inner();
        let mut reply = UploadWidgetFileResponse::default();
        while let Some(message) = stream.message().await? {
            if reply.message_count == 0 {
                reply.widget_id = message.widget_id;
                reply.filename = message.filename;
            }
            reply.message_count += 1;
            reply.byte_count += message.chunk.len() as i64;
        }
        // Only a stream that ended normally counts as a complete file.
        COMPLETED_UPLOADS.lock().expect("lock").push(reply.widget_id.clone());
        Ok(Response::new(reply))
    }

    async fn download_widget_file(
        &self,
        request: Request<DownloadWidgetFileRequest>,
    ) -> Result<Response<BoxStream<'static, Result<DownloadWidgetFileResponse, Status>>>, Status> {
        let r = request.into_inner();
        let mut left = r.size.max(0) as usize;
        let mut first = true;
        let mut messages = Vec::new();
        while left > 0 || first {
            let n = left.min(64 * 1024);
            messages.push(Ok(DownloadWidgetFileResponse {
                chunk: vec![b'x'; n],
                content_type: if first { "text/csv; charset=utf-8".into() } else { String::new() },
                filename: if first { format!("{}.csv", r.widget_id) } else { String::new() },
            }));
            left -= n;
            first = false;
        }
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    async fn forgotten_rule(
        &self,
        _: Request<ForgottenRuleRequest>,
    ) -> Result<Response<ForgottenRuleResponse>, Status> {
        // The authorization layer must refuse the call before it gets here.
        Err(Status::internal("the handler of an RPC without access rule was reached"))
    }

    async fn inspect_call(
        &self,
        request: Request<InspectCallRequest>,
    ) -> Result<Response<InspectCallResponse>, Status> {
        let header =
            |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        Ok(Response::new(InspectCallResponse {
            request_id: request_id::of(&request).unwrap_or_default().to_owned(),
            traceparent: header("traceparent"),
            acting_entity: header("x-socle-entity"),
            client_address: header("x-forwarded-for"),
        }))
    }

    async fn sleep(&self, request: Request<SleepRequest>) -> Result<Response<SleepResponse>, Status> {
        tokio::time::sleep(Duration::from_millis(u64::from(request.into_inner().millis))).await;
        Ok(Response::new(SleepResponse {}))
    }
}

/// The example server, running.
pub struct RunningExample {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl RunningExample {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RunningExample {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Serves [`Example`] on port 0 with `settings` (timeouts, load shedding).
pub async fn spawn_example(settings: ServerSettings) -> anyhow::Result<RunningExample> {
    spawn_example_with(settings, None, None).await
}

/// Like [`spawn_example`], recording RED metrics into `metrics`.
pub async fn spawn_example_with(
    settings: ServerSettings,
    metrics: Option<socle_telemetry::RpcMetrics>,
    authorizer: Option<Arc<dyn socle_server::Authorizer>>,
) -> anyhow::Result<RunningExample> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let host = ServiceHost::new("example", socle_testproto::descriptor_pool(), settings)
        .authorizer(authorizer.unwrap_or_else(|| Arc::new(DeclaredRulesOnly)))
        .add_service(ExampleServiceServer::new(Example));
    let host = match metrics {
        Some(metrics) => host.metrics(metrics),
        None => host,
    };
    tokio::spawn(host.serve(
        listener,
        Box::pin(async move {
            let _ = rx.await;
        }),
    ));
    let running = RunningExample { addr, shutdown: Some(tx) };
    crate::wait_serving(&running.url(), "socle.example.v1.ExampleService").await?;
    Ok(running)
}
