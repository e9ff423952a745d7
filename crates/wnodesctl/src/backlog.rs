//! `wnodesctl backlog`: how far behind each durable is, the dead letters and the VMs per host,
//! once or as a Prometheus exporter.

use wnodes_bus::ErrorChain;

use crate::{BacklogArgs, SOFTWARE, UNAVAILABLE};

pub(crate) async fn backlog(args: BacklogArgs) -> u8 {
    let js = match args.connection.bus("wnodesctl@backlog").await {
        Ok(bus) => bus.jetstream().clone(),
        Err(code) => return code,
    };
    if let Some(addr) = args.serve {
        return serve_backlog(js, addr, args.every).await;
    }
    let report = match wnodes_site::backlog::measure(&js).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return UNAVAILABLE;
        }
    };
    if args.json {
        match serde_json::to_string(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("wnodesctl: {e}");
                return SOFTWARE;
            }
        }
    } else {
        println!(
            "{:<40} {:>9} {:>11} {:>14}  retention",
            "durable", "pending", "ack pending", "oldest (s)"
        );
        for c in &report.consumers {
            println!(
                "{:<40} {:>9} {:>11} {:>14}  {}",
                c.durable,
                c.pending,
                c.ack_pending,
                c.oldest_unprocessed_age_seconds
                    .map_or("-".to_string(), |a| format!("{a:.0}")),
                if c.behind_retention {
                    "LOST MESSAGES (see docs/operations.md)"
                } else {
                    "ok"
                }
            );
        }
        println!(
            "events stream keeps messages {:.0} s",
            report.events_max_age_seconds
        );
        println!("dead letters: {}", report.dead_letters);
        for h in &report.vms {
            println!(
                "VMs on {}: {} preparing, {} running",
                h.host, h.preparing, h.running
            );
        }
    }
    0
}

/// Serves `/metrics` with the last measurement, measuring every `every`.
async fn serve_backlog(
    js: async_nats::jetstream::Context,
    addr: std::net::SocketAddr,
    every: std::time::Duration,
) -> u8 {
    use parking_lot::Mutex;
    use std::sync::Arc;
    let last = Arc::new(Mutex::new(String::new()));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wnodesctl: cannot bind {addr}: {e}");
            return 78;
        }
    };
    let metrics = last.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { m.lock().clone() }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    eprintln!("wnodesctl: serving /metrics on {addr}, measuring every {every:?}");
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return 0,
        }
        match wnodes_site::backlog::measure(&js).await {
            Ok(r) => {
                *last.lock() = wnodes_site::backlog::prometheus_text(&r);
            }
            Err(e) => eprintln!("wnodesctl: measuring the backlog: {}", ErrorChain(&e)),
        }
    }
}
