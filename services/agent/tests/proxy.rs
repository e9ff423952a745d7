//! X.509 proxies with VOMS attribute certificates, made by Debian's `voms-proxy-fake` (package
//! `voms-clients`) from a test PKI made by `openssl`, verified by the agent's
//! `wnodes_agent::proxy::verify`: a valid proxy gives its DN, VO and FQANs; a self-signed proxy,
//! an expired proxy, an AC signed by a VOMS server the LSC does not name, and one whose VOMS
//! server no trusted CA issued are refused, each with its reason.
//!
//! A host test (`wnodes_testkit::host`): without `openssl` and `voms-proxy-fake` it is skipped,
//! or fails naming them under `WNODES_HOST_TESTS=required` (as `scripts/test.sh` runs it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failure is a test failure

use std::{path::Path, process::Command};

use wnodes_agent::proxy::{X509Config, verify};
use wnodes_testkit::{
    host::{self, Precondition},
    host_test,
};

fn tools() -> Result<(), String> {
    for tool in ["openssl", "voms-proxy-fake"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Err(format!(
                "{tool} is not on PATH (apt-get install openssl voms-clients)"
            ));
        }
    }
    Ok(())
}

const NEEDS: &[Precondition] = &[Precondition::Other(
    "openssl and voms-proxy-fake (Debian's voms-clients)",
    tools,
)];

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .env("X509_CERT_DIR", dir.join("certs"))
        .env("X509_VOMS_DIR", dir.join("vomsdir"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` a key and a certificate for `subject`, signed by `ca` (or self-signed).
fn cert(dir: &Path, name: &str, subject: &str, ca: Option<&str>, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    let (key, crt) = (format!("{name}.key"), format!("{name}.pem"));
    match ca {
        None => {
            let mut args = vec![
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key,
                "-out", &crt, "-days", "30", "-subj", subject,
            ];
            for line in ext.lines().filter(|l| !l.is_empty()) {
                args.extend(["-addext", line]);
            }
            run(dir, &args);
        }
        Some(ca) => {
            let csr = format!("{name}.csr");
            run(
                dir,
                &[
                    "openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out",
                    &csr, "-subj", subject,
                ],
            );
            run(
                dir,
                &[
                    "openssl",
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &format!("{ca}.pem"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "10",
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        }
    }
    std::fs::set_permissions(
        dir.join(&key),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
}

/// A proxy of `user` with an AC for VO atlas signed by `voms`.
fn proxy(dir: &Path, out: &str, user: &str, voms: &str) -> Vec<u8> {
    run(
        dir,
        &[
            "voms-proxy-fake",
            "-cert",
            &format!("{user}.pem"),
            "-key",
            &format!("{user}.key"),
            "-hostcert",
            &format!("{voms}.pem"),
            "-hostkey",
            &format!("{voms}.key"),
            "-voms",
            "atlas",
            "-fqan",
            "/atlas/Role=production/Capability=NULL",
            "-fqan",
            "/atlas/Role=NULL/Capability=NULL",
            "-uri",
            "voms.example.org:15000",
            "-out",
            out,
            "-rfc",
        ],
    );
    std::fs::read(dir.join(out)).unwrap()
}

/// The test PKI in `d`: a CA (also in `d/certs`), the user Alice and the VOMS server
/// `voms.example.org`, both issued by the CA, and the LSC naming that server for VO atlas.
/// Returns the leaf certificates' extensions.
fn pki(d: &Path) -> &'static str {
    std::fs::create_dir_all(d.join("certs")).unwrap();
    std::fs::create_dir_all(d.join("vomsdir/atlas")).unwrap();
    let leaf =
        "basicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature,keyEncipherment\n";
    cert(
        d,
        "ca",
        "/C=IT/O=WNoDeS Test/CN=WNoDeS Test CA",
        None,
        "basicConstraints=critical,CA:true\n",
    );
    std::fs::copy(d.join("ca.pem"), d.join("certs/ca.pem")).unwrap();
    cert(
        d,
        "user",
        "/C=IT/O=WNoDeS Test/CN=Alice Tester",
        Some("ca"),
        leaf,
    );
    cert(
        d,
        "voms",
        "/C=IT/O=WNoDeS Test/CN=voms.example.org",
        Some("ca"),
        leaf,
    );
    std::fs::write(
        d.join("vomsdir/atlas/voms.example.org.lsc"),
        "/C=IT/O=WNoDeS Test/CN=voms.example.org\n/C=IT/O=WNoDeS Test/CN=WNoDeS Test CA\n",
    )
    .unwrap();
    leaf
}

fn proxies_are_verified_and_bad_ones_refused_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let leaf = pki(d);
    let cfg = X509Config {
        ca_dir: d.join("certs"),
        vomsdir: d.join("vomsdir"),
    };
    let now = wnodes_identity::unix_now();

    // A valid proxy: the user's DN, the VO and the FQANs, primary first.
    let good = proxy(d, "good.pem", "user", "voms");
    let v = verify(&good, &cfg, now).unwrap();
    assert_eq!(v.dn, "/C=IT/O=WNoDeS Test/CN=Alice Tester");
    assert_eq!(v.vo, "atlas");
    assert_eq!(
        v.fqans,
        [
            "/atlas/Role=production/Capability=NULL",
            "/atlas/Role=NULL/Capability=NULL"
        ]
    );
    let why = |pem: &[u8], at: i64| verify(pem, &cfg, at).unwrap_err().to_string();
    // Expired: the same proxy two days on (voms-proxy-fake makes 12 h proxies).
    let e = why(&good, now + 2 * 86_400);
    assert!(e.contains("expired"), "{e}");
    // Self-signed: a user certificate no trusted CA issued.
    cert(d, "selfie", "/C=IT/O=WNoDeS Test/CN=Mallory", None, leaf);
    let e = why(&proxy(d, "selfie-proxy.pem", "selfie", "voms"), now);
    assert!(e.contains("no trusted CA"), "{e}");
    // An AC signed by a VOMS server with the right name but its own key (self-signed): the
    // LSC names another issuer.
    cert(
        d,
        "evil",
        "/C=IT/O=WNoDeS Test/CN=voms.example.org",
        None,
        leaf,
    );
    let e = why(&proxy(d, "evil-proxy.pem", "user", "evil"), now);
    assert!(
        e.contains("is not trusted for VO 'atlas'") && e.contains("names another server"),
        "{e}"
    );
    // A VOMS server a trusted CA issued, but not the one the LSC names.
    cert(
        d,
        "voms2",
        "/C=IT/O=WNoDeS Test/CN=other-voms.example.org",
        Some("ca"),
        leaf,
    );
    let e = why(&proxy(d, "other-proxy.pem", "user", "voms2"), now);
    assert!(e.contains("names another server"), "{e}");
    // No LSC for the VO at all.
    std::fs::remove_file(d.join("vomsdir/atlas/voms.example.org.lsc")).unwrap();
    let e = why(&good, now);
    assert!(e.contains("no LSC file"), "{e}");
    eprintln!("valid: {v:?}; refusals checked");
}

/// The whole path: the real job starter (`X509_USER_PROXY`) sends the proxy's certificates to the
/// real agent, which verifies them and publishes `job.started` with the DN, the FQANs and the
/// proxy's VO (over the starter's `--dev-vo`); a self-signed proxy is refused with its reason.
async fn a_job_starter_s_proxy_names_the_job_s_vo_dn_and_fqans() {
    use futures::StreamExt;
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let leaf = pki(d);
    proxy(d, "good.pem", "user", "voms");
    cert(d, "selfie", "/C=IT/O=WNoDeS Test/CN=Mallory", None, leaf);
    proxy(d, "selfie-proxy.pem", "selfie", "voms");
    for f in ["good.pem", "selfie-proxy.pem"] {
        std::fs::set_permissions(
            d.join(f),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
    }

    let host = "hv1.example.org";
    let nats = wnodes_testkit::NatsServer::start().await.unwrap();
    let bus = wnodes_testkit::bus::connect(&nats.admin(), "test@hv1")
        .await
        .unwrap();
    let mut sub = bus
        .client()
        .subscribe(format!(
            "wnodes.evt.{}.job.started",
            wnodes_bus::subject::encode_host(host).unwrap()
        ))
        .await
        .unwrap();
    bus.client().flush().await.unwrap();
    let socket = d.join("run/agent.sock");
    let creds = nats.creds(&wnodes_bus::roles::AGENT, host).unwrap();
    let conf = wnodes_testkit::process::ServiceConfig::new(host, &creds, &d.join("state"))
        .set("agent", "socket", socket.as_path())
        .set("agent", "allow_dev_identity", true)
        .set("agent.identity", "ca_dir", d.join("certs").as_path())
        .set("agent.identity", "vomsdir", d.join("vomsdir").as_path());
    let mut agent =
        wnodes_testkit::process::ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-agent"), d)
            .config(&conf)
            .spawn()
            .unwrap();
    agent
        .wait_stderr(
            "the agent listening",
            std::time::Duration::from_secs(30),
            |l| l.contains("Host agent listening").then_some(()),
        )
        .await
        .unwrap();
    let exe = std::env::current_exe().unwrap();
    let bins = exe.parent().unwrap();
    let bins = if bins.ends_with("deps") {
        bins.parent().unwrap()
    } else {
        bins
    };
    let starter = |proxy: &str, job: &str| {
        let mut c = tokio::process::Command::new(bins.join("wnodes-bridge"));
        c.args([
            "job-starter",
            "--dev-job-id",
            job,
            "--dev-vo",
            "othervo",
            "--socket",
        ])
        .arg(&socket)
        .args(["--", "/bin/true"])
        .env_clear()
        .env("X509_USER_PROXY", d.join(proxy))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
        c
    };
    // Refused first: a self-signed proxy.
    let out = starter("selfie-proxy.pem", "x509-0")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(
        stderr.contains("the X.509 proxy is refused") && stderr.contains("no trusted CA"),
        "{stderr}"
    );
    // Then a valid one: its job starts as the proxy says.
    let mut child = starter("good.pem", "x509-1").spawn().unwrap();
    let msg = tokio::time::timeout(std::time::Duration::from_secs(30), sub.next())
        .await
        .expect("job.started in time")
        .unwrap();
    let ev = wnodes_bus::proto::Event::decode(msg.payload).unwrap();
    let Some(wnodes_bus::proto::event::Body::JobStarted(js)) = ev.body else {
        panic!("{ev:?}")
    };
    let job = js.job.unwrap();
    assert_eq!(
        job.run.unwrap().job_id,
        "x509-1",
        "the refused start published nothing"
    );
    assert_eq!(job.vo, "atlas");
    let id = job.identity.unwrap();
    assert_eq!(id.x509_dn, "/C=IT/O=WNoDeS Test/CN=Alice Tester");
    assert_eq!(id.voms_fqans[0], "/atlas/Role=production/Capability=NULL");
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(sync proxies_are_verified_and_bad_ones_refused_with_their_reason needs NEEDS),
        host_test!(
            multi_thread a_job_starter_s_proxy_names_the_job_s_vo_dn_and_fqans needs NEEDS
        ),
    ])
}
