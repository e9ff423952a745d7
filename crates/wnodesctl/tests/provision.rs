//! `wnodesctl provision` against a real nats-server configured by its own output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::Path, process::Output, time::Duration};

use wnodes_testkit::NatsServer;

fn wnodesctl(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_wnodesctl"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn site(path: &Path, hosts: &[&str], extra: &str) {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
    std::fs::write(
        path,
        format!("site = \"T1\"\nhosts = [{}]\n{extra}", hosts.join(", ")),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn provision_twice_changes_nothing_and_a_changed_site_is_reported_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let desc = dir.path().join("site.toml");
    let out = dir.path().join("nats");
    let (desc_s, out_s) = (desc.to_str().unwrap(), out.to_str().unwrap());
    site(&desc, &["hv1.example.org"], "");

    // First the identities, then a server that uses them.
    let o = wnodesctl(&["provision", "--site", desc_s, "--out", out_s]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        stdout(&o).contains("create  creds launcher-hv1_example_org"),
        "{}",
        stdout(&o)
    );
    let conf = std::fs::read_to_string(out.join("nats-auth.conf")).unwrap();
    let nats = NatsServer::start_with_config(&conf).await.unwrap();
    let url = nats.url();
    // `wnodesctl provision` of this site against this server, with `extra` arguments.
    let provision = |extra: &[&str]| {
        let mut args = vec![
            "provision",
            "--site",
            desc_s,
            "--out",
            out_s,
            "--nats",
            &url,
        ];
        args.extend_from_slice(extra);
        wnodesctl(&args)
    };

    let o = provision(&[]);
    let text = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert!(text.contains("create  stream WNODES_EVENTS"), "{text}");
    assert!(
        text.contains("create  consumer launcher-hv1_example_org"),
        "{text}"
    );
    assert!(text.contains("create  consumer accounting"), "{text}");

    // Second run: nothing to do, nothing written.
    let before = std::fs::read_to_string(out.join("creds/admin.creds")).unwrap();
    let o = provision(&[]);
    let text = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert!(
        text.contains("identities: 0 to create, 0 to update")
            && text.contains("streams and consumers: 0 to create, 0 to update"),
        "{text}"
    );
    assert!(
        !text.contains("  create  ") && !text.contains("  update  "),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("creds/admin.creds")).unwrap(),
        before
    );
    let o = provision(&["--check"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");

    // A changed description: a new host and a shorter retention. A dry run names each change
    // and changes nothing; --check exits 1.
    site(
        &desc,
        &["hv1.example.org", "hv2.example.org"],
        "[streams]\nevents_max_age = \"2days\"\n",
    );
    let o = provision(&["--dry-run"]);
    let text = stdout(&o);
    assert!(o.status.success(), "{o:?}");
    assert!(
        text.contains("update  stream WNODES_EVENTS: max_age is 7days (expected 2days)"),
        "{text}"
    );
    assert!(
        text.contains("create  consumer launcher-hv2_example_org"),
        "{text}"
    );
    assert!(
        text.contains("create  creds agent-hv2_example_org"),
        "{text}"
    );
    assert!(text.contains("(dry run: nothing was changed)"), "{text}");
    assert!(!out.join("creds/agent-hv2_example_org.creds").exists());
    let o = provision(&["--check"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");

    let admin = wnodes_bus::NatsConfig {
        url: url.clone(),
        creds_file: Some(out.join("creds/admin.creds")),
        ..Default::default()
    };
    let js = async_nats::jetstream::new(
        wnodes_bus::connect::connect(&admin, "test", None, None)
            .await
            .unwrap(),
    );
    let mut stream = js.get_stream("WNODES_EVENTS").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.max_age, Duration::from_secs(7 * 86400));
    assert!(
        stream
            .consumer_info("launcher-hv2_example_org")
            .await
            .is_err()
    );

    // Applied, it converges.
    let o = provision(&[]);
    assert!(o.status.success(), "{o:?}");
    let o = provision(&["--check"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

#[test]
fn an_invalid_description_exits_65_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let desc = dir.path().join("site.toml");
    site(&desc, &["hv1.example.org", "hv1.example.org"], "");
    let o = wnodesctl(&[
        "provision",
        "--site",
        desc.to_str().unwrap(),
        "--out",
        dir.path().join("nats").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(65), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("listed twice"), "{err}");
}

/// Against a server that speaks TLS with a private CA: refused without `--tls-ca` (the
/// certificate cannot be verified), provisioned with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_tls_server_with_a_private_ca_needs_tls_ca() {
    let dir = tempfile::tempdir().unwrap();
    let desc = dir.path().join("site.toml");
    let out = dir.path().join("nats");
    let (desc_s, out_s) = (desc.to_str().unwrap(), out.to_str().unwrap());
    site(&desc, &["hv1.example.org"], "");
    let o = wnodesctl(&["provision", "--site", desc_s, "--out", out_s]);
    assert!(o.status.success(), "{o:?}");
    let conf = std::fs::read_to_string(out.join("nats-auth.conf")).unwrap();
    let pki = wnodes_testkit::TestPki::generate().unwrap();
    let nats = NatsServer::start_with_config(&format!("{conf}\n{}", pki.nats_tls_block(false)))
        .await
        .unwrap();
    let url = format!("tls://127.0.0.1:{}", nats.port());
    let base = [
        "provision",
        "--site",
        desc_s,
        "--out",
        out_s,
        "--nats",
        url.as_str(),
    ];
    let o = wnodesctl(&base);
    assert_eq!(o.status.code(), Some(69), "{o:?}");
    let ca = pki.ca_pem().to_str().unwrap();
    let o = wnodesctl(&[&base[..], &["--tls-ca", ca]].concat());
    assert!(o.status.success(), "{o:?}");
    assert!(
        stdout(&o).contains("create  stream WNODES_EVENTS"),
        "{}",
        stdout(&o)
    );
}
