//! `grpc.health.v1.Health` on the edge, as an aggregator: `Check` with an
//! empty service name answers for the edge itself; with a service name it is
//! forwarded to the upstream serving that service, so a client can check
//! any service through the edge on gRPC, gRPC-web and REST
//! (`GET /api/v1/health?service=socle.crm.v1.OrganizationService`).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_client::HealthClient,
    health_server::Health,
};

use crate::upstream::Upstreams;

/// See the module docs.
#[derive(Clone)]
pub struct EdgeHealth {
    upstreams: Upstreams,
    serving: Arc<AtomicBool>,
}

impl EdgeHealth {
    /// An aggregator over `upstreams`.
    pub fn new(upstreams: Upstreams, serving: Arc<AtomicBool>) -> Self {
        EdgeHealth { upstreams, serving }
    }
}

#[tonic::async_trait]
impl Health for EdgeHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let service = request.get_ref().service.clone();
        if service.is_empty() {
            // The edge itself: NOT_SERVING once it is shutting down.
            let status =
                if self.serving.load(Ordering::SeqCst) { ServingStatus::Serving } else { ServingStatus::NotServing };
            return Ok(tonic::Response::new(HealthCheckResponse { status: status as i32 }));
        }
        let upstream = self
            .upstreams
            .for_service(&service)
            .ok_or_else(|| tonic::Status::not_found(format!("unknown service {service}")))?;
        let mut client = HealthClient::new(upstream);
        match client.check(HealthCheckRequest { service }).await {
            Ok(response) => Ok(response),
            // The upstream does not know the service: a caller's mistake.
            Err(status) if status.code() == tonic::Code::NotFound => Err(status),
            // Unreachable, draining (cancelled, GOAWAY), timing out: an upstream
            // that cannot answer its health check is not serving.
            Err(status) => {
                tracing::debug!(code = ?status.code(), "upstream health check failed");
                Ok(tonic::Response::new(HealthCheckResponse { status: ServingStatus::NotServing as i32 }))
            }
        }
    }

    type WatchStream =
        Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send + 'static>>;

    async fn watch(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("watch the upstream services directly"))
    }
}
