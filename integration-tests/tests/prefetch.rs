//! `wnodesctl prefetch` against the real `wnodes-image` binary on a nats-server with the site's
//! authorization: the image is fetched into the host's cache and reported per host as JSON, a
//! host without an image service is named with its reason (exit 1), a second run finds the
//! image cached (also for every host of a site description), and an image not in the catalog
//! is refused with the service's reason.
//!
//! The binaries are those `cargo build --workspace --bins` (or `-p wnodesctl -p wnodes-image
//! --bins`) put in `target/debug`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::PathBuf, process::Output, time::Duration};

use sha2::{Digest, Sha256};
use wnodes_bus::roles;
use wnodes_testkit::{NatsServer, ServiceConfig, ServiceProcess};

const HOST: &str = "hv1.example.org";
const ABSENT: &str = "hv2.example.org";

/// `target/<profile>/<name>`, next to this test's `deps/` directory (only the two binaries this
/// test runs need to be built).
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().join("..").join(name);
    assert!(
        path.is_file(),
        "{} is not built (cargo build --workspace --bins)",
        path.display()
    );
    path
}

fn prefetch(nats: &NatsServer, args: &[&str]) -> Output {
    let admin = nats.admin();
    std::process::Command::new(bin("wnodesctl"))
        .args(["prefetch", "--json", "--nats", &admin.url, "--creds"])
        .arg(admin.creds_file.unwrap())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(o: &Output) -> Vec<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(o)))
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn wnodesctl_prefetch_fills_a_hosts_cache_and_names_the_hosts_that_failed() {
    let nats = NatsServer::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image: Vec<u8> = (0..1_500_000u32).map(|i| (i % 241) as u8).collect();
    let src = tmp.path().join("el9.raw");
    std::fs::write(&src, &image).unwrap();
    let sha = hex::encode(Sha256::digest(&image));
    let conf = ServiceConfig::new(
        HOST,
        &nats.identity(&roles::IMAGE, HOST).await.unwrap(),
        &tmp.path().join("state"),
    )
    .set(
        "image.catalog.el9",
        "url",
        format!("file://{}", src.display()),
    )
    .set("image.catalog.el9", "sha256", sha.as_str());
    let cache = tmp.path().join("cache");
    let mut service = ServiceProcess::builder(bin("wnodes-image"), tmp.path())
        .config(&conf)
        .wnodes_env("IMAGE__CACHE_DIR", &cache)
        .spawn()
        .unwrap();
    service
        .wait_stderr("the prefetch subscription", Duration::from_secs(30), |l| {
            l.contains("Taking prefetch requests").then_some(())
        })
        .await
        .unwrap();

    // hv1 fetches; hv2 has no image service: exit 1, hv2 named with its reason.
    let o = prefetch(
        &nats,
        &["--image", "el9", "--hosts", &format!("{HOST},{ABSENT}")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let hosts = json(&o);
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    let (h1, h2) = (&hosts[0], &hosts[1]);
    assert_eq!(h1["host"], HOST);
    assert_eq!(h1["status"], "fetched", "{h1}");
    assert_eq!(h1["ok"], true);
    assert_eq!(h1["bytes_done"], image.len() as u64);
    assert_eq!(h1["bytes_total"], image.len() as u64);
    assert_eq!(h1["artifacts"][0]["part"], "disk");
    assert_eq!(h1["artifacts"][0]["sha256"], sha.as_str());
    assert_eq!(h2["host"], ABSENT);
    assert_eq!(h2["status"], "failed");
    assert_eq!(
        h2["reason"],
        format!("no image service answered on {ABSENT} (nothing takes its requests)")
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!("{HOST}: fetched"))
            && stderr.contains(&format!("prefetch of 'el9' failed on {ABSENT} (")),
        "{stderr}"
    );
    let cached = std::fs::read(cache.join("sha256").join(&sha)).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&cached)), sha);

    // Again on hv1 alone: cached, exit 0.
    let o = prefetch(&nats, &["--image", "el9", "--hosts", HOST]);
    assert!(o.status.success(), "{}", text(&o));
    let hosts = json(&o);
    assert_eq!(hosts[0]["status"], "cached", "{hosts:?}");
    assert_eq!(hosts[0]["artifacts"][0]["cached"], true);

    // Every host of the site description: hv1 cached, hv2 without an image service.
    let site = tmp.path().join("site.toml");
    std::fs::write(
        &site,
        format!("site = \"T1\"\nhosts = [\"{HOST}\", \"{ABSENT}\"]\n"),
    )
    .unwrap();
    let o = prefetch(&nats, &["--image", "el9", "--site", site.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let hosts = json(&o);
    let status: Vec<(&str, &str)> = hosts
        .iter()
        .map(|h| (h["host"].as_str().unwrap(), h["status"].as_str().unwrap()))
        .collect();
    assert_eq!(status, [(HOST, "cached"), (ABSENT, "failed")], "{hosts:?}");

    // An image the host does not know: the service's reason.
    let o = prefetch(&nats, &["--image", "centos9", "--hosts", HOST]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(
        json(&o)[0]["reason"],
        "image 'centos9' is not in this host's catalog"
    );

    // A bad host name is a usage error, and nothing is sent.
    let o = prefetch(&nats, &["--image", "el9", "--hosts", "HV1;rm"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));

    let status = service.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}: {}", service.stderr());
}
