//! `wnodesctl job RUN`: one run's events as a timeline (offsets from its first event, who
//! published each), its per-phase durations and its trace id. Reads as the monitor.

use serde_json::json;
use wnodes_bus::ErrorChain;

use crate::{JobArgs, UNAVAILABLE};

pub(crate) async fn job(args: JobArgs) -> u8 {
    let js = match args.connection.bus("wnodesctl@job").await {
        Ok(bus) => bus.jetstream().clone(),
        Err(code) => return code,
    };
    let events = match wnodes_bus::runs::read(&js, &args.run, args.host.as_deref()).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return UNAVAILABLE;
        }
    };
    if events.is_empty() {
        eprintln!(
            "wnodesctl: no events of run {} in the stream (a run key is SITE/lrms/JOB/ATTEMPT; older runs expire with the retention)",
            args.run
        );
        return 1;
    }
    let t0 = events[0].time;
    let offset = |t: std::time::SystemTime| t.duration_since(t0).unwrap_or_default().as_secs_f64();
    let trace_id = events
        .iter()
        .find(|e| e.event_type == wnodes_bus::EventType::JobStarted)
        .or(events.first())
        .and_then(|e| e.trace_id.clone());
    let phases = wnodes_bus::runs::timeline(&events);
    if args.json {
        let v = json!({
            "run": args.run,
            "trace_id": trace_id,
            "events": events.iter().map(|e| json!({
                "type": e.event_type.name(),
                "offset_s": offset(e.time),
                "source": e.event.source,
                "host": e.event.host,
                "id": e.event.id,
                "sequence": e.sequence,
            })).collect::<Vec<_>>(),
            "phases": phases.iter().map(|p| json!({
                "phase": p.name,
                "seconds": p.duration.as_secs_f64(),
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return 0;
    }
    println!(
        "run {}  trace {}",
        args.run,
        trace_id.as_deref().unwrap_or("-")
    );
    for e in &events {
        println!(
            "  {:>9.3} s  {:<20} {}",
            offset(e.time),
            e.event_type.name(),
            e.event.source
        );
    }
    println!("phases:");
    for p in &phases {
        println!("  {:<40} {:>8.3} s", p.name, p.duration.as_secs_f64());
    }
    0
}
