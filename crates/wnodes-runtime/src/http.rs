//! `/healthz` (the process is alive), `/readyz` (connected to NATS and streams/consumers in
//! place) and `/metrics` (Prometheus text format).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use parking_lot::Mutex;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use wnodes_bus::Bus;

/// Set by the service once its streams and consumer are in place; until then, why not.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<ReadinessInner>);

#[derive(Debug, Default)]
pub struct ReadinessInner {
    ready: AtomicBool,
    reason: Mutex<Option<String>>,
    /// `wnodes_service_ready`: 1 when ready (what `/readyz` says, for alerts).
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Readiness {
    pub fn set_ready(&self) {
        *self.0.reason.lock() = None;
        self.0.ready.store(true, Ordering::SeqCst);
        self.0.gauge.set(1);
    }
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::SeqCst)
    }
    /// Not ready, and why (shown by `/readyz`).
    pub fn set_not_ready(&self, reason: String) {
        self.0.ready.store(false, Ordering::SeqCst);
        self.0.gauge.set(0);
        *self.0.reason.lock() = Some(reason);
    }

    /// The `wnodes_service_ready` gauge (registered by the runtime).
    pub fn gauge(&self) -> prometheus_client::metrics::gauge::Gauge {
        self.0.gauge.clone()
    }
    /// Why it is not ready, when it said.
    pub fn reason(&self) -> Option<String> {
        self.0.reason.lock().clone()
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Mutex<Registry>>,
    ready: Readiness,
    bus: Bus,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if !s.bus.is_connected() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to NATS\n".into(),
        )
    } else if !s.ready.is_ready() {
        let why = s
            .ready
            .reason()
            .unwrap_or_else(|| "streams or consumers not in place yet".into());
        (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
    } else {
        (StatusCode::OK, "ready\n".to_string())
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    let encoded = prometheus_client::encoding::text::encode(&mut out, &s.registry.lock()).is_ok();
    if !encoded {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            String::new(),
        );
    }
    (
        StatusCode::OK,
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}

/// Binds `addr` and serves until `shutdown`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Mutex<Registry>>,
    ready: Readiness,
    bus: Bus,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            registry,
            ready,
            bus,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %wnodes_bus::ErrorChain(&e), "HTTP endpoint failed.");
        }
    });
    Ok(local)
}
