//! Golden tests: usage records written by hand in WNoDeS's own units (bytes, float seconds,
//! Unix milliseconds, a JSON array of FQANs) export to exactly what APEL's own code wrote
//! (`tests/fixtures/generated_*.msg`, see `tests/fixtures/ORIGIN.txt`), compared field by field
//! and byte for byte; and the reference messages parse back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use wnodes_accounting_types::UsageRecord;
use wnodes_apel::{
    ApelConfig, Benchmark, BenchmarkKind, CloudRecord, JobRecord, Kind, SummaryRecord, SyncRecord,
    message::{self, MAX_MESSAGE_BYTES, MAX_RECORDS},
    records::ApelRecord,
};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

const DN: &str =
    "/DC=ch/DC=cern/OU=Organic Units/OU=Users/CN=atlpilo1/CN=614260/CN=Robot: ATLAS Pilot1";

/// An ATLAS pilot's run, in WNoDeS's units.
fn atlas_run(job_id: &str, started_ms: i64, stopped_ms: i64) -> UsageRecord {
    UsageRecord {
        run_key: format!("INFN-T1/htcondor/{job_id}/1"),
        site: "INFN-T1".into(),
        lrms: "htcondor".into(),
        job_id: job_id.into(),
        run_attempt: 1,
        host: "sn-01.cr.cnaf.infn.it".into(),
        vm_id: "vm-0123456789ab".into(),
        vo: "atlas".into(),
        user_name: "pilatl001".into(),
        uid: Some(41200),
        gid: Some(1307),
        x509_dn: DN.into(),
        fqans: r#"["/atlas/Role=production/Capability=NULL","/atlas/Role=NULL/Capability=NULL"]"#
            .into(),
        queue: "atlas".into(),
        cores: 8,
        cpu_seconds: 320_000.0,
        peak_memory_bytes: 16_000_000 * 1024,
        wall_seconds: 43_200.0,
        exit_code: 0,
        lrms_exit_code: Some(0),
        stop_reason: "guest_poweroff".into(),
        started_ms: Some(started_ms),
        stopped_ms: Some(stopped_ms),
        recorded_ms: stopped_ms + 1500,
        ..Default::default()
    }
}

fn cnaf() -> ApelConfig {
    ApelConfig {
        site_name: None,
        submit_host: Some("ce01-htc.cr.cnaf.infn.it:9619/ce01-htc.cr.cnaf.infn.it-condor".into()),
        infrastructure_description: Some("APEL-HTCONDORCE-HTCONDOR".into()),
        cloud_compute_service: Some("WNoDeS".into()),
        benchmark: Some(Benchmark {
            kind: BenchmarkKind::Hepspec06,
            per_core: 12.5,
        }),
    }
}

fn one_message<R: ApelRecord>(records: &[R]) -> String {
    let rendered: Vec<String> = records
        .iter()
        .map(|r| message::render(r).unwrap())
        .collect();
    let mut msgs = message::split(R::KIND, &rendered, MAX_MESSAGE_BYTES, MAX_RECORDS).unwrap();
    assert_eq!(msgs.len(), 1);
    msgs.remove(0).text
}

/// Field by field: same header, same records, same field names in the same order, same values
/// (nulls as `None`). Panics naming the first difference.
fn assert_same_fields(ours: &str, theirs: &str) {
    let a = message::parse(ours).unwrap();
    let b = message::parse(theirs).unwrap();
    assert_eq!((&a.header, &a.version), (&b.header, &b.version));
    assert_eq!(a.records.len(), b.records.len());
    for (i, (ra, rb)) in a.records.iter().zip(&b.records).enumerate() {
        assert_eq!(ra.keys(), rb.keys(), "record {i}: field names or order");
        for (k, v) in rb.to_map() {
            assert_eq!(ra.to_map()[&k], v, "record {i}: field {k}");
        }
    }
}

#[test]
fn job_records_equal_apels_own_v0_3_output() {
    let cfg = cnaf();
    let jobs: Vec<JobRecord> = [
        atlas_run("1234567.0", 1_700_000_000_000, 1_700_043_200_000),
        atlas_run("1234568.0", 1_700_001_000_000, 1_700_044_200_000),
    ]
    .iter()
    .map(|u| {
        let mut j = JobRecord::from_usage(u, &cfg).unwrap();
        // The usage record has no virtual memory (issue 11 item 1): the only field set by hand.
        assert_eq!(j.memory_virtual_kb, None);
        j.memory_virtual_kb = Some(20_000_000);
        j
    })
    .collect();
    let ours = one_message(&jobs);
    let theirs = fixture("generated_job.msg");
    assert_same_fields(&ours, &theirs);
    assert_eq!(ours, theirs);
}

#[test]
fn a_job_record_with_optional_fields_missing_matches_apels_v0_4_output_field_by_field() {
    // generated_job04.msg: no machine, queue, DN, infrastructure description or memory.
    let mut u = atlas_run("1234567.0", 1_700_000_000_000, 1_700_043_200_000);
    u.host = String::new();
    u.queue = String::new();
    u.x509_dn = String::new();
    u.peak_memory_bytes = 0;
    let cfg = ApelConfig {
        infrastructure_description: None,
        benchmark: Some(Benchmark {
            kind: BenchmarkKind::Hepscore23,
            per_core: 13.1,
        }),
        ..cnaf()
    };
    let ours = one_message(&[JobRecord::from_usage(&u, &cfg).unwrap()]);
    let ours = message::parse(&ours).unwrap();
    let theirs = message::parse(&fixture("generated_job04.msg")).unwrap();
    assert_eq!(ours.header, theirs.header);
    let (a, b) = (ours.records[0].to_map(), theirs.records[0].to_map());
    // v0.3 writes the benchmark as two fields, v0.4 as one `{type: value}`.
    assert_eq!(
        b["ServiceLevel"].as_deref(),
        Some("{hepscore23: 13.1}"),
        "the fixture's v0.4 benchmark"
    );
    assert_eq!(a["ServiceLevelType"].as_deref(), Some("HEPscore23"));
    assert_eq!(a["ServiceLevel"].as_deref(), Some("13.1"));
    // A WNoDeS run always runs on one node; the fixture leaves NodeCount out.
    assert_eq!(a["NodeCount"].as_deref(), Some("1"));
    assert_eq!(b["NodeCount"], None);
    for (k, v) in &b {
        if k != "ServiceLevel" && k != "NodeCount" {
            assert_eq!(&a[k], v, "field {k}");
        }
    }
    let extra: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    assert_eq!(extra, ["ServiceLevelType"]);
}

#[test]
fn a_cloud_record_equals_apels_own_v0_4_output_absent_fields_included() {
    let mut u = atlas_run("1234567.0", 1_700_000_000_000, 1_700_043_200_000);
    u.vm_id = "7d1f3a52-0c1e-4f38-9f0e-3b2a6b1c9e01".into();
    u.host = "vwn-000123.cr.cnaf.infn.it".into();
    u.cores = 1;
    u.cpu_seconds = 40_000.0;
    u.peak_memory_bytes = 2048 * 1024 * 1024;
    let cfg = ApelConfig {
        benchmark: Some(Benchmark {
            kind: BenchmarkKind::Hepspec06,
            per_core: 10.0,
        }),
        ..cnaf()
    };
    let mut vm = CloudRecord::from_usage(&u, &cfg).unwrap();
    // What the usage record does not carry (issue 11 item 1): the local group's name (the gid
    // is written instead), public IPs, the disk and the image. Set by hand; every other field,
    // the absent ones (SuspendDuration, Network*, StorageRecordId) included, comes from the
    // usage record and the config.
    assert_eq!(
        (
            vm.local_group_id.as_deref(),
            vm.public_ip_count,
            vm.disk_gb,
            vm.image_id.as_deref()
        ),
        (Some("1307"), None, None, None)
    );
    vm.local_group_id = Some("atlas".into());
    vm.public_ip_count = Some(0);
    vm.disk_gb = Some(20);
    vm.image_id = Some("sl5-x86_64-wn".into());
    let ours = one_message(&[vm]);
    let theirs = fixture("generated_cloud.msg");
    assert_same_fields(&ours, &theirs);
    assert_eq!(ours, theirs);
}

/// 100 jobs of March 2010 at RAL-LCG2 whose sums are those of APEL's own summary and sync
/// test messages: 99 × (2342 s wall, 2444 s CPU) + one (2398 s, 2479 s).
fn ral_jobs() -> Vec<JobRecord> {
    let cfg = ApelConfig {
        site_name: Some("RAL-LCG2".into()),
        submit_host: Some("sub.rl.ac.uk".into()),
        infrastructure_description: None,
        cloud_compute_service: None,
        benchmark: Some(Benchmark {
            kind: BenchmarkKind::Hepspec06,
            per_core: 1.0,
        }),
    };
    (0..100)
        .map(|i| {
            let start_ms = 1_267_488_000_000 + i * 3_600_000; // 2010-03-02T00:00Z onwards
            let (wall, cpu) = if i == 99 {
                (2398.0, 2479.0)
            } else {
                (2342.0, 2444.0)
            };
            let u = UsageRecord {
                run_key: format!("ral/slurm/{i}/1"),
                site: "ral".into(),
                lrms: "slurm".into(),
                job_id: i.to_string(),
                run_attempt: 1,
                host: "wn1.rl.ac.uk".into(),
                vm_id: format!("vm-{i:012x}"),
                vo: String::new(),
                user_name: String::new(),
                uid: None,
                gid: None,
                x509_dn: String::new(),
                fqans: "[]".into(),
                queue: String::new(),
                cores: 1,
                cpu_seconds: cpu,
                peak_memory_bytes: 0,
                wall_seconds: wall,
                exit_code: 0,
                lrms_exit_code: None,
                stop_reason: "guest_poweroff".into(),
                started_ms: Some(start_ms),
                stopped_ms: Some(start_ms + 2_398_000),
                recorded_ms: start_ms + 2_400_000,
                ..Default::default()
            };
            JobRecord::from_usage(&u, &cfg).unwrap()
        })
        .collect()
}

#[test]
fn summaries_match_apels_normalised_summary_test_message_field_by_field() {
    let sums = SummaryRecord::summarise(&ral_jobs()).unwrap();
    assert_eq!(sums.len(), 1);
    let ours = message::parse(&one_message(&sums)).unwrap();
    let theirs = message::parse(&fixture("apel_test_rf_nsr_text.msg")).unwrap();
    assert_eq!(
        (&ours.header, &ours.version),
        (&theirs.header, &theirs.version)
    );
    let (a, b) = (ours.records[0].to_map(), theirs.records[0].to_map());
    for (k, v) in &b {
        assert_eq!(&a[k], v, "field {k}");
    }
    // The fields APEL's test message leaves out, as we fill them for jobs with no user.
    let extra: BTreeMap<&str, Option<&str>> = a
        .iter()
        .filter(|(k, _)| !b.contains_key(*k))
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    assert_eq!(
        extra,
        BTreeMap::from([
            ("EarliestEndTime", Some("1267490398")),
            ("GlobalUserName", None),
            ("Infrastructure", Some("local")),
            ("InfrastructureDescription", None),
            ("LatestEndTime", Some("1267846798")),
            ("NodeCount", Some("1")),
            ("Processors", Some("1")),
            ("SubmitHost", Some("sub.rl.ac.uk")),
            ("VO", None),
            ("VOGroup", None),
            ("VORole", None),
        ])
    );
}

#[test]
fn sync_records_equal_apels_sync_test_message_field_by_field() {
    let ours = message::parse(&one_message(&SyncRecord::count(&ral_jobs()))).unwrap();
    let theirs = message::parse(&fixture("apel_test_rf_sync_text.msg")).unwrap();
    assert_eq!(
        (&ours.header, &ours.version),
        (&theirs.header, &theirs.version)
    );
    assert_eq!(ours.records.len(), 1);
    assert_eq!(ours.records[0].to_map(), theirs.records[0].to_map());
}

#[test]
fn summaries_group_by_month_user_and_role_and_normalise_by_the_benchmark() {
    let cfg = cnaf();
    let mut runs = vec![
        atlas_run("1", 1_700_000_000_000, 1_700_043_200_000), // 2023-11-14
        atlas_run("2", 1_700_001_000_000, 1_700_044_200_000), // 2023-11-14
        atlas_run("3", 1_701_388_000_000, 1_701_431_200_000), // 2023-12-01
    ];
    runs[1].cpu_seconds = 100_000.4;
    let mut other_role = atlas_run("4", 1_700_000_000_000, 1_700_043_200_000);
    other_role.fqans = r#"["/atlas/Role=pilot"]"#.into();
    runs.push(other_role);
    let jobs: Vec<JobRecord> = runs
        .iter()
        .map(|u| JobRecord::from_usage(u, &cfg).unwrap())
        .collect();
    let sums = SummaryRecord::summarise(&jobs).unwrap();
    let text = one_message(&sums);
    let parsed = message::parse(&text).unwrap();
    assert_eq!(parsed.header, "APEL-summary-job-message");
    let got: Vec<BTreeMap<String, Option<String>>> =
        parsed.records.iter().map(|r| r.to_map()).collect();
    let pick = |m: &BTreeMap<String, Option<String>>, k: &str| m[k].clone().unwrap_or_default();
    let rows: Vec<[String; 7]> = got
        .iter()
        .map(|m| {
            [
                pick(m, "Month"),
                pick(m, "VORole"),
                pick(m, "NumberOfJobs"),
                pick(m, "WallDuration"),
                pick(m, "CpuDuration"),
                pick(m, "NormalisedWallDuration"),
                pick(m, "NormalisedCpuDuration"),
            ]
        })
        .collect();
    let s = |v: &[&str; 7]| v.map(str::to_string);
    assert_eq!(
        rows,
        [
            // 2 jobs: 86400 s wall; 320000 + 100000 s CPU; × 12.5 HS06 per core.
            s(&[
                "11",
                "Role=pilot",
                "1",
                "43200",
                "320000",
                "540000",
                "4000000"
            ]),
            s(&[
                "11",
                "Role=production",
                "2",
                "86400",
                "420000",
                "1080000",
                "5250000"
            ]),
            s(&[
                "12",
                "Role=production",
                "1",
                "43200",
                "320000",
                "540000",
                "4000000"
            ]),
        ]
    );
    for m in &got {
        for k in [
            "Site",
            "Month",
            "Year",
            "WallDuration",
            "CpuDuration",
            "NormalisedWallDuration",
            "NormalisedCpuDuration",
            "NumberOfJobs",
        ] {
            assert!(m[k].is_some(), "mandatory {k}");
        }
    }
    let no_benchmark = ApelConfig {
        benchmark: None,
        ..cnaf()
    };
    let j = JobRecord::from_usage(&runs[0], &no_benchmark).unwrap();
    assert!(SummaryRecord::summarise(&[j]).is_err());
}

#[test]
fn messages_parse_back_to_the_reference_format() {
    // Each kind's header, the field names formats.md §4 lists, `%%` after every record.
    let cfg = cnaf();
    let u = atlas_run("1234567.0", 1_700_000_000_000, 1_700_043_200_000);
    let job = JobRecord::from_usage(&u, &cfg).unwrap();
    let cases: Vec<(Kind, String, &[&str])> = vec![
        (
            Kind::Job,
            one_message(std::slice::from_ref(&job)),
            &[
                "Site",
                "SubmitHost",
                "MachineName",
                "Queue",
                "LocalJobId",
                "LocalUserId",
                "GlobalUserName",
                "FQAN",
                "VO",
                "VOGroup",
                "VORole",
                "WallDuration",
                "CpuDuration",
                "Processors",
                "NodeCount",
                "StartTime",
                "EndTime",
                "InfrastructureDescription",
                "InfrastructureType",
                "MemoryReal",
                "MemoryVirtual",
                "ServiceLevelType",
                "ServiceLevel",
            ],
        ),
        (
            Kind::Summary,
            one_message(&SummaryRecord::summarise(std::slice::from_ref(&job)).unwrap()),
            &[
                "Site",
                "Month",
                "Year",
                "GlobalUserName",
                "VO",
                "VOGroup",
                "VORole",
                "SubmitHost",
                "Infrastructure",
                "InfrastructureDescription",
                "NodeCount",
                "Processors",
                "EarliestEndTime",
                "LatestEndTime",
                "WallDuration",
                "CpuDuration",
                "NormalisedWallDuration",
                "NormalisedCpuDuration",
                "NumberOfJobs",
            ],
        ),
        (
            Kind::Cloud,
            one_message(&[CloudRecord::from_usage(&u, &cfg).unwrap()]),
            &[
                "VMUUID",
                "SiteName",
                "CloudComputeService",
                "MachineName",
                "LocalUserId",
                "LocalGroupId",
                "GlobalUserName",
                "FQAN",
                "Status",
                "StartTime",
                "EndTime",
                "SuspendDuration",
                "WallDuration",
                "CpuDuration",
                "CpuCount",
                "NetworkType",
                "NetworkInbound",
                "NetworkOutbound",
                "PublicIPCount",
                "Memory",
                "Disk",
                "BenchmarkType",
                "Benchmark",
                "StorageRecordId",
                "ImageId",
                "CloudType",
            ],
        ),
        (
            Kind::Sync,
            one_message(&SyncRecord::count(std::slice::from_ref(&job))),
            &["Site", "SubmitHost", "NumberOfJobs", "Month", "Year"],
        ),
    ];
    for (kind, text, names) in cases {
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(kind.header()));
        assert!(text.ends_with("\n%%\n"), "{kind}: ends with %%");
        assert_eq!(text.matches("\n%%\n").count(), 1, "{kind}: one record");
        let p = message::parse(&text).unwrap();
        assert_eq!(p.records[0].keys(), names, "{kind}");
    }
    // Units: seconds, epoch seconds, KB (job) and MB (cloud).
    let m = message::parse(&one_message(std::slice::from_ref(&job))).unwrap();
    let r = &m.records[0];
    assert_eq!(r.get("WallDuration"), Some("43200"));
    assert_eq!(r.get("StartTime"), Some("1700000000"));
    assert_eq!(r.get("MemoryReal"), Some("16000000"));
    let m = message::parse(&one_message(&[CloudRecord::from_usage(&u, &cfg).unwrap()])).unwrap();
    assert_eq!(m.records[0].get("Memory"), Some("15625"));
    assert_eq!(m.records[0].get("CpuCount"), Some("8.0"));
}

#[test]
fn real_messages_from_apel_and_osg_parse() {
    let p = message::parse(&fixture("gracc-apel_08_2016_summary_v0.3_excerpt.msg")).unwrap();
    assert_eq!(
        (p.header.as_str(), p.version.as_str()),
        ("APEL-summary-job-message", "v0.3")
    );
    assert_eq!(p.records.len(), 3);
    assert_eq!(p.records[2].get("NormalisedWallDuration"), Some("525231"));
    for name in [
        "generated_job.msg",
        "generated_job04.msg",
        "generated_cloud.msg",
        "apel_test_rf_nsr_text.msg",
        "apel_test_rf_sync_text.msg",
    ] {
        assert!(
            !message::parse(&fixture(name)).unwrap().records.is_empty(),
            "{name}"
        );
    }
}

#[test]
fn impossible_usage_is_refused_not_exported() {
    let cfg = cnaf();
    let mut u = atlas_run("1", 1_700_000_000_000, 1_700_043_200_000);
    u.stopped_ms = Some(1_600_000_000_000);
    assert!(JobRecord::from_usage(&u, &cfg).is_err());
    let mut u = atlas_run("1", 1_700_000_000_000, 1_700_043_200_000);
    u.cpu_seconds = -1.0;
    assert!(JobRecord::from_usage(&u, &cfg).is_err());
    let mut u = atlas_run("", 1_700_000_000_000, 1_700_043_200_000);
    u.job_id = String::new();
    assert!(JobRecord::from_usage(&u, &cfg).is_err());
    let mut u = atlas_run("1", 1_700_000_000_000, 1_700_043_200_000);
    u.queue = "a\nb".into();
    let j = JobRecord::from_usage(&u, &cfg).unwrap();
    assert!(message::render(&j).is_err());
}

#[test]
fn many_records_split_into_messages_under_one_megabyte_each_record_once() {
    let cfg = cnaf();
    let rendered: Vec<String> = (0..2500)
        .map(|i| {
            let mut u = atlas_run(&format!("{i}.0"), 1_700_000_000_000, 1_700_043_200_000);
            u.x509_dn = format!("{DN}/CN={}", "x".repeat(200));
            message::render(&JobRecord::from_usage(&u, &cfg).unwrap()).unwrap()
        })
        .collect();
    let msgs = message::split(Kind::Job, &rendered, MAX_MESSAGE_BYTES, MAX_RECORDS).unwrap();
    assert!(msgs.len() >= 3, "{}", msgs.len());
    let mut ids = Vec::new();
    for m in &msgs {
        assert!(m.text.len() <= MAX_MESSAGE_BYTES && m.text.len() < 1_000_000);
        let p = message::parse(&m.text).unwrap();
        assert!(p.records.len() <= MAX_RECORDS);
        assert_eq!(p.records.len(), m.records.len());
        ids.extend(
            p.records
                .iter()
                .map(|r| r.get("LocalJobId").unwrap().to_string()),
        );
    }
    assert_eq!(ids, (0..2500).map(|i| format!("{i}.0")).collect::<Vec<_>>());
}

/// A record that carries its host's benchmark and what its VM was given: the job record's
/// `ServiceLevel` and the cloud record's `Benchmark` are the record's (not the site's), its guest
/// RAM is `MemoryVirtual` (KiB), its scratch the cloud record's `Disk` (GB, rounded up), its
/// image the cloud record's `ImageId`.
#[test]
fn a_record_with_its_hosts_benchmark_and_its_vms_details() {
    let u = UsageRecord {
        benchmark_kind: "hepscore23".into(),
        benchmark_per_core: Some(18.5),
        memory_bytes: Some(16 << 30),
        scratch_bytes: Some((20 << 30) + 1),
        image: "el9".into(),
        image_sha256: "ab".repeat(32),
        ..atlas_run("7001", 1_764_547_200_000, 1_764_590_400_000)
    };
    let cfg = cnaf();
    assert_ne!(
        cfg.benchmark.map(|b| b.per_core),
        Some(18.5),
        "the site's benchmark differs"
    );
    let job = JobRecord::from_usage(&u, &cfg).unwrap();
    let fields: BTreeMap<String, Option<String>> =
        message::parse(&one_message(&[job])).unwrap().records[0].to_map();
    assert_eq!(fields["ServiceLevelType"].as_deref(), Some("HEPscore23"));
    assert_eq!(fields["ServiceLevel"].as_deref(), Some("18.5"));
    assert_eq!(fields["MemoryVirtual"].as_deref(), Some("16777216"));
    let cloud = CloudRecord::from_usage(&u, &cfg).unwrap();
    let fields: BTreeMap<String, Option<String>> =
        message::parse(&one_message(&[cloud])).unwrap().records[0].to_map();
    assert_eq!(fields["Benchmark"].as_deref(), Some("18.5"));
    assert_eq!(fields["BenchmarkType"].as_deref(), Some("HEPscore23"));
    assert_eq!(fields["Disk"].as_deref(), Some("21"));
    assert_eq!(fields["ImageId"].as_deref(), Some("el9"));
    // Without them, the site's benchmark and no VM details, as before.
    let plain = atlas_run("7002", 1_764_547_200_000, 1_764_590_400_000);
    let job = JobRecord::from_usage(&plain, &cfg).unwrap();
    let fields: BTreeMap<String, Option<String>> =
        message::parse(&one_message(&[job])).unwrap().records[0].to_map();
    assert_eq!(
        fields["ServiceLevel"].as_deref().map(str::to_owned),
        cfg.benchmark.map(|b| b.per_core.to_string())
    );
    assert_eq!(fields["MemoryVirtual"], None);
}
