//! `wnodesctl dlq`: the dead letters, as the admin. `list` and `show` read; `redrive` publishes
//! each dead letter again to its original subject (every consumer of that subject sees it again;
//! those that handled it skip it by its idempotency key) and deletes it, so an entry is never
//! redriven twice (`wnodes_bus::dlq::redrive`).

use std::io::{BufRead, IsTerminal, Write};

use prost::Message;
use serde_json::{Value, json};
use wnodes_bus::{
    Bus, ErrorChain, EventExt,
    dlq::{self, DeadLetter, Redriven},
    proto,
};

use crate::{DlqArgs, DlqCommand, SOFTWARE, UNAVAILABLE, USAGE};

pub(crate) async fn dlq(args: DlqArgs) -> u8 {
    let bus = match args.connection.bus("wnodesctl@dlq").await {
        Ok(b) => b,
        Err(code) => return code,
    };
    match args.command {
        DlqCommand::List { consumer, json } => list(&bus, consumer.as_deref(), json).await,
        DlqCommand::Show { sequence, json } => show(&bus, sequence, json).await,
        DlqCommand::Redrive {
            sequences,
            all,
            consumer,
            yes,
        } => redrive(&bus, sequences, all, consumer.as_deref(), yes).await,
    }
}

/// The event inside a dead letter, when it decodes.
fn event(d: &DeadLetter) -> Option<proto::Event> {
    proto::Event::decode(d.payload.clone()).ok()
}

fn age(d: &DeadLetter) -> String {
    d.stored_at
        .and_then(|t| t.elapsed().ok())
        .map_or("-".into(), |a| {
            humantime::format_duration(std::time::Duration::from_secs(a.as_secs())).to_string()
        })
}

fn to_json(d: &DeadLetter, with_headers: bool) -> Value {
    let ev = event(d);
    let mut v = json!({
        "sequence": d.sequence,
        "consumer": d.consumer,
        "subject": d.original_subject,
        "reason": d.reason,
        "attempts": d.attempts,
        "error": d.error,
        "events_stream_sequence": d.stream_sequence,
        "age": age(d),
        "event_id": ev.as_ref().map(|e| e.id.clone()),
        "run": ev.as_ref().map(|e| e.run_key()),
        "host": ev.as_ref().map(|e| e.host.clone()),
        "payload_bytes": d.payload.len(),
    });
    if with_headers {
        let headers: serde_json::Map<String, Value> = d
            .headers
            .iter()
            .map(|(k, vs)| {
                let k: &str = k.as_ref();
                (
                    k.to_owned(),
                    Value::Array(vs.iter().map(|v| Value::String(v.to_string())).collect()),
                )
            })
            .collect();
        v["headers"] = Value::Object(headers);
    }
    v
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

async fn list(bus: &Bus, consumer: Option<&str>, json: bool) -> u8 {
    let all = match dlq::read_all(bus, consumer).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return UNAVAILABLE;
        }
    };
    if json {
        let v: Vec<Value> = all.iter().map(|d| to_json(d, false)).collect();
        println!("{}", Value::Array(v));
        return 0;
    }
    println!(
        "{:>6}  {:<10}  {:<28}  {:<44}  {:<10}  {:>3}  error",
        "seq", "age", "consumer", "subject", "reason", "att"
    );
    for d in &all {
        println!(
            "{:>6}  {:<10}  {:<28}  {:<44}  {:<10}  {:>3}  {}",
            d.sequence,
            age(d),
            cut(&d.consumer, 28),
            cut(&d.original_subject, 44),
            d.reason,
            d.attempts,
            cut(&d.error, 80)
        );
    }
    println!("{} dead letter(s)", all.len());
    0
}

async fn show(bus: &Bus, sequence: u64, json: bool) -> u8 {
    let d = match dlq::get(bus, sequence).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            eprintln!("wnodesctl: no dead letter {sequence} (never stored, redriven, or expired)");
            return 1;
        }
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return UNAVAILABLE;
        }
    };
    let v = to_json(&d, true);
    if json {
        println!("{v}");
    } else {
        match serde_json::to_string_pretty(&v) {
            Ok(t) => println!("{t}"),
            Err(e) => {
                eprintln!("wnodesctl: {e}");
                return SOFTWARE;
            }
        }
        if let Some(ev) = event(&d) {
            println!("event: {ev:?}");
        }
    }
    0
}

async fn redrive(
    bus: &Bus,
    sequences: Vec<u64>,
    all: bool,
    consumer: Option<&str>,
    yes: bool,
) -> u8 {
    let explicit = !all;
    let targets: Vec<u64> = if all {
        match dlq::read_all(bus, consumer).await {
            Ok(l) => l.iter().map(|d| d.sequence).collect(),
            Err(e) => {
                eprintln!("wnodesctl: {}", ErrorChain(&e));
                return UNAVAILABLE;
            }
        }
    } else {
        sequences
    };
    if targets.is_empty() {
        if explicit {
            eprintln!("wnodesctl: name the dead letters to redrive, or --all");
            return USAGE;
        }
        println!("nothing to redrive");
        return 0;
    }
    if !yes {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            eprintln!(
                "wnodesctl: redriving {} dead letter(s) needs a confirmation: run it on a terminal, or pass --yes",
                targets.len()
            );
            return USAGE;
        }
        print!(
            "Redrive {} dead letter(s) to their original subjects? [y/N] ",
            targets.len()
        );
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        if stdin.lock().read_line(&mut answer).is_err()
            || !matches!(answer.trim(), "y" | "Y" | "yes")
        {
            println!("nothing redriven");
            return 0;
        }
    }
    let n = targets.len();
    let (mut done, mut missing) = (0usize, 0usize);
    for (i, seq) in targets.into_iter().enumerate() {
        match dlq::redrive(bus, seq).await {
            Ok(Redriven::Published { subject, sequence }) => {
                done += 1;
                eprintln!(
                    "[{}/{n}] dead letter {seq} → {subject} (stored as {sequence})",
                    i + 1
                );
            }
            Ok(Redriven::NotFound) => {
                missing += 1;
                eprintln!(
                    "[{}/{n}] dead letter {seq}: not found (already redriven or expired); nothing published",
                    i + 1
                );
            }
            Err(e) => {
                eprintln!("[{}/{n}] dead letter {seq}: {}", i + 1, ErrorChain(&e));
                println!("redriven {done} of {n}");
                return SOFTWARE;
            }
        }
    }
    println!("redriven {done} of {n}");
    if explicit && missing > 0 { 1 } else { 0 }
}
