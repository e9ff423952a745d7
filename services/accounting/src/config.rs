//! The `[accounting]` config section.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::StoreUrl;

/// `[accounting]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The store holding the usage records and the consumer's idempotency keys (a record
    /// commits with its key): a SQLite path or `sqlite://PATH`, or `postgres://user:pw@host/db`;
    /// default `<state_dir>/accounting.db`. Env `WNODES_ACCOUNTING__DATABASE`.
    pub database: Option<StoreUrl>,
    /// `[accounting.apel]`: what APEL messages need that a usage record does not say (the
    /// `apel-export` subcommand).
    pub apel: wnodes_apel::ApelConfig,
    /// `[accounting.apel_export]`: export to APEL from the service, periodically; off when
    /// absent.
    pub apel_export: Option<PeriodicApelExport>,
    /// Where the report API (gRPC, `proto/wnodes/v1/accounting.proto`; `wnodesctl accounting
    /// report`) listens, e.g. `127.0.0.1:9651`; off when absent. Env
    /// `WNODES_ACCOUNTING__GRPC_ADDR`.
    pub grpc_addr: Option<std::net::SocketAddr>,
    /// PEM server certificate chain of the report API; with `tls_key` it speaks TLS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate it signed (mTLS).
    pub client_ca: Option<PathBuf>,
    /// The benchmark of groups of hosts (`[[accounting.host_benchmarks]]`): a record gets the
    /// first whose `hosts` pattern matches its hypervisor, else `[accounting.apel] benchmark`.
    pub host_benchmarks: Vec<HostBenchmark>,
}

/// `[[accounting.host_benchmarks]]`: the benchmark of the hosts a pattern matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostBenchmark {
    /// A host name, or a pattern where `*` matches any run of characters
    /// (`hv*.cnaf.infn.it`).
    pub hosts: String,
    pub kind: wnodes_apel::BenchmarkKind,
    /// Score per core.
    pub per_core: f64,
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (none included).
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    // The last `*` seen and the text position it was tried at: backtrack there on a mismatch.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// The benchmarks a record can get: per host group, then the site's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Benchmarks {
    pub by_host: Vec<HostBenchmark>,
    pub site: Option<wnodes_apel::Benchmark>,
}

impl Benchmarks {
    /// The benchmark of `host`.
    pub fn of(&self, host: &str) -> Option<wnodes_apel::Benchmark> {
        self.by_host
            .iter()
            .find(|b| glob(&b.hosts, host))
            .map(|b| wnodes_apel::Benchmark {
                kind: b.kind,
                per_core: b.per_core,
            })
            .or(self.site)
    }
}

/// `[accounting.apel_export]`: what `serve` exports, and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodicApelExport {
    /// The SSM outgoing queue directory (e.g. `/var/spool/apel/outgoing`).
    pub out: PathBuf,
    /// How often; default 1 h. The first export runs at start.
    #[serde(
        default = "PeriodicApelExport::default_every",
        with = "humantime_serde"
    )]
    pub every: std::time::Duration,
    /// How many whole months before the current one each export covers again (records that
    /// came late, summaries whose figures changed); default 1. Every kind is exported, for the
    /// period from the first day of that month (UTC) to tomorrow.
    #[serde(default = "PeriodicApelExport::default_months_back")]
    pub months_back: u8,
}

impl PeriodicApelExport {
    fn default_every() -> std::time::Duration {
        std::time::Duration::from_secs(3600)
    }
    fn default_months_back() -> u8 {
        1
    }
}

impl Config {
    /// The benchmarks records get.
    pub fn benchmarks(&self) -> Benchmarks {
        Benchmarks {
            by_host: self.host_benchmarks.clone(),
            site: self.apel.benchmark,
        }
    }

    /// Host patterns non-empty, scores positive. Errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        for (i, b) in self.host_benchmarks.iter().enumerate() {
            if b.hosts.trim().is_empty() {
                return Err(format!("accounting.host_benchmarks[{i}].hosts: empty"));
            }
            if !b.per_core.is_finite() || b.per_core <= 0.0 {
                return Err(format!(
                    "accounting.host_benchmarks[{i}].per_core: {} is not a positive number",
                    b.per_core
                ));
            }
        }
        Ok(())
    }

    /// The store, given the service's state directory.
    pub fn store_url(&self, state_dir: &std::path::Path) -> StoreUrl {
        self.database
            .clone()
            .unwrap_or_else(|| StoreUrl::Sqlite(state_dir.join("accounting.db")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_defaults_to_the_state_dir_and_can_be_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wnodes.toml");
        std::fs::write(&path, "site = \"T1\"\nhost = \"c.example.org\"\n").unwrap();
        let c = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap();
        assert_eq!(
            c.service.store_url(std::path::Path::new("/var/lib/x")),
            StoreUrl::Sqlite("/var/lib/x/accounting.db".into())
        );
        std::fs::write(
            &path,
            "site = \"T1\"\nhost = \"c.example.org\"\n[accounting]\ndatabase = \"/srv/acct.db\"\n",
        )
        .unwrap();
        let c = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap();
        assert_eq!(
            c.service.store_url(std::path::Path::new("/var/lib/x")),
            StoreUrl::Sqlite("/srv/acct.db".into())
        );
        std::fs::write(
            &path,
            "site = \"T1\"\nhost = \"c.example.org\"\n[accounting]\n\
             database = \"postgres://acct:secret@db.example.org:5433/wnodes\"\n",
        )
        .unwrap();
        let c = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap();
        let url = c.service.store_url(std::path::Path::new("/var/lib/x"));
        assert_eq!(
            url,
            StoreUrl::Postgres("postgres://acct:secret@db.example.org:5433/wnodes".into())
        );
        assert_eq!(
            url.to_string(),
            "postgres://acct@db.example.org:5433/wnodes",
            "logs never show the password"
        );
        std::fs::write(
            &path,
            "site = \"T1\"\nhost = \"c.example.org\"\n[accounting]\ndatabase = \"mysql://x/y\"\n",
        )
        .unwrap();
        let e = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap_err();
        assert!(e.to_string().contains("mysql://x/y"), "{e}");
        std::fs::write(
            &path,
            "site = \"T1\"\nhost = \"c.example.org\"\n[accounting]\ndatabse = \"/srv/acct.db\"\n",
        )
        .unwrap();
        let e = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap_err();
        assert!(e.to_string().contains("databse"), "{e}");
    }

    #[test]
    fn host_patterns_match_and_the_first_benchmark_wins() {
        for (p, t, m) in [
            ("hv*.cnaf.infn.it", "hv01.cnaf.infn.it", true),
            ("hv*.cnaf.infn.it", "hv01.cnaf.infn.it.evil", false),
            ("hv*.cnaf.infn.it", "wn01.cnaf.infn.it", false),
            ("*", "anything", true),
            ("hv01", "hv01", true),
            ("hv01", "hv011", false),
            ("*a*b", "xaxxb", true),
            ("*a*b", "xaxxbc", false),
        ] {
            assert_eq!(glob(p, t), m, "{p} {t}");
        }
        let hs = |hosts: &str, per_core| HostBenchmark {
            hosts: hosts.into(),
            kind: wnodes_apel::BenchmarkKind::Hepscore23,
            per_core,
        };
        let b = Benchmarks {
            by_host: vec![hs("hv0*.x", 20.0), hs("hv*.x", 15.0)],
            site: Some(wnodes_apel::Benchmark {
                kind: wnodes_apel::BenchmarkKind::Hepspec06,
                per_core: 10.0,
            }),
        };
        assert_eq!(b.of("hv01.x").map(|b| b.per_core), Some(20.0));
        assert_eq!(b.of("hv11.x").map(|b| b.per_core), Some(15.0));
        assert_eq!(
            b.of("wn1.x").map(|b| (b.kind, b.per_core)),
            Some((wnodes_apel::BenchmarkKind::Hepspec06, 10.0))
        );
        let bad = Config {
            host_benchmarks: vec![hs("hv*", 0.0)],
            ..Config::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("host_benchmarks[0].per_core")
        );
    }

    #[test]
    fn apel_sections_parse_with_defaults_and_refuse_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wnodes.toml");
        let base = "site = \"T1\"\nhost = \"c.example.org\"\n";
        std::fs::write(
            &path,
            format!(
                "{base}[accounting.apel]\nsubmit_host = \"ce1:9619/ce1-condor\"\n\
                 benchmark = {{ kind = \"hepscore23\", per_core = 15.3 }}\n\
                 [accounting.apel_export]\nout = \"/var/spool/apel/outgoing\"\n"
            ),
        )
        .unwrap();
        let c = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap();
        let b = c.service.apel.benchmark.unwrap();
        assert_eq!(
            (b.kind, b.per_core),
            (wnodes_apel::BenchmarkKind::Hepscore23, 15.3)
        );
        let p = c.service.apel_export.unwrap();
        assert_eq!(p.every, std::time::Duration::from_secs(3600));
        assert_eq!(p.months_back, 1);
        std::fs::write(
            &path,
            format!("{base}[accounting.apel]\nsubmithost = \"x\"\n"),
        )
        .unwrap();
        let e = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap_err();
        assert!(e.to_string().contains("submithost"), "{e}");
    }
}
