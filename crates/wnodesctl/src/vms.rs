//! `wnodesctl vms [--host H] [--all]`: the VMs the events stream knows of, each with its run,
//! host, state, age, image and resources, folded from its `vm.*` events
//! ([`wnodes_bus::vms`]). Without `--all`, only those not ended (preparing or running). Reads
//! as the monitor.

use std::time::{Duration, SystemTime};

use serde_json::json;
use wnodes_bus::{ErrorChain, vms::VmView};

use crate::{UNAVAILABLE, VmsArgs};

pub(crate) async fn vms(args: VmsArgs) -> u8 {
    let js = match args.connection.bus("wnodesctl@vms").await {
        Ok(bus) => bus.jetstream().clone(),
        Err(code) => return code,
    };
    let vms = match wnodes_bus::vms::read(&js, args.host.as_deref()).await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return UNAVAILABLE;
        }
    };
    let now = SystemTime::now();
    let shown: Vec<&VmView> = vms
        .iter()
        .filter(|v| args.all || !v.state.ended())
        .collect();
    if args.json {
        let v: Vec<_> = shown.iter().map(|v| view_json(v, now)).collect();
        println!("{}", serde_json::Value::Array(v));
        return 0;
    }
    if shown.is_empty() {
        println!(
            "no {}VMs in the events stream{}",
            if args.all {
                ""
            } else {
                "running or preparing "
            },
            args.host
                .as_deref()
                .map(|h| format!(" for {h}"))
                .unwrap_or_default()
        );
        return 0;
    }
    println!(
        "{:<16} {:<24} {:<10} {:>8}  {:<12} {:>5} {:>8} {:>8}  RUN",
        "VM", "HOST", "STATE", "AGE", "IMAGE", "CORES", "MEMORY", "SCRATCH"
    );
    for v in shown {
        println!(
            "{:<16} {:<24} {:<10} {:>8}  {:<12} {:>5} {:>8} {:>8}  {}{}",
            v.vm_id,
            v.host,
            v.state.name(),
            age(now, v.since),
            if v.image.is_empty() { "-" } else { &v.image },
            v.cores,
            gib(v.memory_bytes),
            gib(v.scratch_bytes),
            v.run,
            match (&v.exit_code, &v.failure) {
                (Some(code), _) => format!("  (exit {code})"),
                (None, Some((phase, reason))) => format!("  ({phase}: {reason})"),
                _ => String::new(),
            }
        );
    }
    0
}

fn view_json(v: &VmView, now: SystemTime) -> serde_json::Value {
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    json!({
        "vm_id": v.vm_id,
        "host": v.host,
        "run": v.run,
        "state": v.state.name(),
        "age_s": now.duration_since(v.since).unwrap_or_default().as_secs_f64(),
        "since": unix(v.since),
        "last_event": unix(v.last),
        "image": v.image,
        "cores": v.cores,
        "memory_bytes": v.memory_bytes,
        "scratch_bytes": v.scratch_bytes,
        "exit_code": v.exit_code,
        "failed_phase": v.failure.as_ref().map(|f| &f.0),
        "failed_reason": v.failure.as_ref().map(|f| &f.1),
    })
}

/// `42s`, `7m`, `3h`, `2d`.
pub(crate) fn age(now: SystemTime, since: SystemTime) -> String {
    let s = now
        .duration_since(since)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Bytes as GiB with one decimal (`-` for none).
fn gib(b: u64) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.1}G", b as f64 / f64::from(1u32 << 30))
    }
}
