//! The outgoing queue read back by PyPI's `dirq` `QueueSimple`, the library `ssmsend` reads its
//! outgoing directory with (installed by `scripts/install-deps.sh dirq` into `.tools/python`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::PathBuf, process::ExitCode};

use wnodes_accounting_types::UsageRecord;
use wnodes_apel::{
    ApelConfig, Benchmark, BenchmarkKind, CloudRecord, JobRecord, Kind, OutgoingQueue,
    message::{self, MAX_MESSAGE_BYTES},
};
use wnodes_testkit::{
    host::{self, Precondition},
    host_test,
};

fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/python")
}

fn dirq_installed() -> Result<(), String> {
    if python_dir().join("dirq/QueueSimple.py").is_file() {
        Ok(())
    } else {
        Err(format!(
            "PyPI dirq in {} (run scripts/install-deps.sh dirq)",
            python_dir().display()
        ))
    }
}

const NEEDS: &[Precondition] = &[
    Precondition::Python3,
    Precondition::Other("PyPI dirq", dirq_installed),
];

/// Lists the queue with `QueueSimple`, purges it (temporaries and locks of any age), then
/// locks, reads and removes every element, as `ssmsend` does; prints JSON.
const READER: &str = r#"
import json, sys
from dirq.QueueSimple import QueueSimple
q = QueueSimple(sys.argv[1])
before = q.count()
q.purge(maxtemp=0, maxlock=0)
out = []
name = q.first()
while name:
    if q.lock(name):
        data = q.get(name)
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        out.append([name, data])
        q.remove(name)
    name = q.next()
print(json.dumps({"before": before, "elements": out, "after": q.count()}))
"#;

fn usage(job_id: &str) -> UsageRecord {
    UsageRecord {
        run_key: format!("INFN-T1/slurm/{job_id}/1"),
        site: "INFN-T1".into(),
        lrms: "slurm".into(),
        job_id: job_id.into(),
        run_attempt: 1,
        host: "hv1.example.org".into(),
        vm_id: format!("vm-{job_id:0>12}"),
        vo: "cms".into(),
        user_name: "cms001".into(),
        uid: Some(1001),
        gid: Some(1001),
        x509_dn: "/DC=org/CN=someone".into(),
        fqans: r#"["/cms/Role=pilot"]"#.into(),
        queue: "cms".into(),
        cores: 4,
        cpu_seconds: 7000.0,
        peak_memory_bytes: 4 << 30,
        wall_seconds: 3600.0,
        exit_code: 0,
        lrms_exit_code: Some(0),
        stop_reason: "guest_poweroff".into(),
        started_ms: Some(1_764_547_200_000),
        stopped_ms: Some(1_764_550_800_000),
        recorded_ms: 1_764_550_801_000,
        ..Default::default()
    }
}

fn queue_read_back_by_pypi_dirq() {
    let cfg = ApelConfig {
        benchmark: Some(Benchmark {
            kind: BenchmarkKind::Hepscore23,
            per_core: 15.3,
        }),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let q = OutgoingQueue::open(dir.path()).unwrap();
    let jobs: Vec<String> = ["1", "2", "3"]
        .iter()
        .map(|id| message::render(&JobRecord::from_usage(&usage(id), &cfg).unwrap()).unwrap())
        .collect();
    let cloud =
        vec![message::render(&CloudRecord::from_usage(&usage("1"), &cfg).unwrap()).unwrap()];
    // Two job messages (at most 2 records each) and one cloud message, committed; one more
    // message staged only (as a crash before the rename leaves it): dirq must not see it.
    let mut texts = Vec::new();
    for m in message::split(Kind::Job, &jobs, MAX_MESSAGE_BYTES, 2)
        .unwrap()
        .into_iter()
        .chain(message::split(Kind::Cloud, &cloud, MAX_MESSAGE_BYTES, 2).unwrap())
    {
        let staged = q.stage(m.text.as_bytes()).unwrap();
        q.commit(&staged).unwrap();
        texts.push(m.text);
    }
    let left_staged = q.stage(b"APEL-sync-message: v0.1\nSite: X\n%%\n").unwrap();
    assert_eq!(texts.len(), 3);

    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(READER)
        .arg(dir.path())
        .env("PYTHONPATH", python_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3 dirq reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["before"], 3, "{v}");
    assert_eq!(v["after"], 0, "{v}");
    let elements = v["elements"].as_array().unwrap();
    let names: Vec<&str> = elements.iter().map(|e| e[0].as_str().unwrap()).collect();
    let read: Vec<&str> = elements.iter().map(|e| e[1].as_str().unwrap()).collect();
    // The same messages, in the order they were queued (dirq's order is its names' order).
    assert_eq!(read, texts.iter().map(String::as_str).collect::<Vec<_>>());
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    for (name, text) in names.iter().zip(&read) {
        let p = message::parse(text).unwrap();
        assert!(!p.records.is_empty(), "{name}");
    }
    // dirq's purge did not touch the staged message: it is still there to be settled.
    assert!(q.is_staged(&left_staged).unwrap());
    assert!(q.elements().unwrap().is_empty());
}

fn main() -> ExitCode {
    host::main(vec![
        host_test!(sync queue_read_back_by_pypi_dirq needs NEEDS),
    ])
}
