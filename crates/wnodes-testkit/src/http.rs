//! A loopback HTTP server for download tests (the image service fetches from it), and a plain
//! `GET` of a service's own endpoints (`/readyz`, `/metrics`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{http::StatusCode, routing};

/// Serves `body` on `/img` after `delay`, counting requests;
/// `/missing` answers 404, `/unavailable` 503 (counted too).
pub async fn serve(body: Vec<u8>, delay: Duration) -> std::io::Result<(String, Arc<AtomicUsize>)> {
    let count = Arc::new(AtomicUsize::new(0));
    let (c, c503) = (count.clone(), count.clone());
    let app = axum::Router::new()
        .route(
            "/img",
            routing::get(move || {
                let c = c.clone();
                let body = body.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    body
                }
            }),
        )
        .route(
            "/missing",
            routing::get(|| async { (StatusCode::NOT_FOUND, "no such image") }),
        )
        .route(
            "/unavailable",
            routing::get(move || {
                c503.fetch_add(1, Ordering::SeqCst);
                async { (StatusCode::SERVICE_UNAVAILABLE, "try later") }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), count))
}

/// `GET path` on `addr` (`127.0.0.1:9601`) over HTTP/1.0; the whole response, status line and
/// headers included.
///
/// # Errors
/// When the connection or the exchange fails.
pub async fn get(addr: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
