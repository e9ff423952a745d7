//! `wnodesctl hosts [--host H] [--check]`: every service's last heartbeat from the hosts
//! bucket ([`wnodes_bus::heartbeat`]), by host: state (`running`, `stale` when it stopped
//! beating without a goodbye, `stopped`), readiness and why not, version, age of the last
//! beat, pid and `/metrics` address. Reads as the monitor. With `--check`, exits 1 when any
//! shown service is stale or not ready.

use std::time::SystemTime;

use serde_json::json;
use wnodes_bus::{
    ErrorChain,
    heartbeat::{self, Seen, ServiceState},
};

use crate::{HostsArgs, UNAVAILABLE, vms::age};

/// What a heartbeat says, seen now.
fn state(s: &Seen, now: SystemTime) -> &'static str {
    match s.beat.state {
        ServiceState::Stopped => "stopped",
        ServiceState::Running if s.beat.is_stale(s.stored, now) => "stale",
        ServiceState::Running => "running",
    }
}

pub(crate) async fn hosts(args: HostsArgs) -> u8 {
    let js = match args.connection.bus("wnodesctl@hosts").await {
        Ok(bus) => bus.jetstream().clone(),
        Err(code) => return code,
    };
    let read = match heartbeat::read(&js).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return UNAVAILABLE;
        }
    };
    if !read.unreadable.is_empty() {
        eprintln!(
            "wnodesctl: {} key(s) of bucket {} hold no heartbeat this version reads, skipped: {}",
            read.unreadable.len(),
            heartbeat::HOSTS_BUCKET,
            read.unreadable.join(", ")
        );
    }
    let now = SystemTime::now();
    let shown: Vec<&Seen> = read
        .beats
        .iter()
        .filter(|s| args.host.as_deref().is_none_or(|h| s.beat.host == h))
        .collect();
    let unhealthy = shown
        .iter()
        .filter(|s| state(s, now) != "running" || !s.beat.ready)
        .count();
    if args.json {
        let v: Vec<_> = shown
            .iter()
            .map(|s| {
                json!({
                    "host": s.beat.host,
                    "service": s.beat.service,
                    "identity": s.beat.identity,
                    "state": state(s, now),
                    "ready": s.beat.ready,
                    "reason": s.beat.reason,
                    "version": s.beat.version,
                    "pid": s.beat.pid,
                    "http_addr": s.beat.http_addr,
                    "last_heartbeat_age_s": now.duration_since(s.stored).unwrap_or_default().as_secs_f64(),
                    "interval_s": s.beat.interval_ms as f64 / 1000.0,
                    "started_ms": s.beat.started_ms,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else if shown.is_empty() {
        println!(
            "no heartbeats in bucket {}{} (services beat once they start; `wnodesctl provision` makes the bucket)",
            heartbeat::HOSTS_BUCKET,
            args.host
                .as_deref()
                .map(|h| format!(" for {h}"))
                .unwrap_or_default()
        );
    } else {
        println!(
            "{:<24} {:<11} {:<8} {:<5} {:<8} {:>9} {:>8}  HTTP",
            "HOST", "SERVICE", "STATE", "READY", "VERSION", "LAST BEAT", "PID"
        );
        for s in &shown {
            let b = &s.beat;
            println!(
                "{:<24} {:<11} {:<8} {:<5} {:<8} {:>9} {:>8}  {}{}",
                if b.host.is_empty() {
                    "(central)"
                } else {
                    &b.host
                },
                b.service,
                state(s, now),
                if b.ready { "yes" } else { "no" },
                b.version,
                age(now, s.stored),
                b.pid,
                b.http_addr,
                b.reason
                    .as_deref()
                    .map(|r| format!("  (not ready: {r})"))
                    .unwrap_or_default()
            );
        }
        let hosts: std::collections::BTreeSet<&str> =
            shown.iter().map(|s| s.beat.host.as_str()).collect();
        println!(
            "{} service(s) on {} host(s){}; {} stale, stopped or not ready",
            shown.len(),
            hosts.iter().filter(|h| !h.is_empty()).count(),
            if hosts.contains("") {
                " and central"
            } else {
                ""
            },
            unhealthy
        );
    }
    if args.check && unhealthy > 0 { 1 } else { 0 }
}
