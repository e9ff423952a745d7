//! `wnodesctl accounting report`: usage of a period from accounting's report API
//! (`proto/wnodes/v1/accounting.proto`, `[accounting] grpc_addr`), grouped by VO, user, queue,
//! day or month, as a table, JSON or CSV.

use std::path::PathBuf;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use wnodes_bus::proto::{ReportKey, ReportRequest, ReportRow, accounting_client::AccountingClient};

use crate::{UNAVAILABLE, USAGE};

#[derive(Debug, clap::Args)]
pub struct AccountingArgs {
    #[command(subcommand)]
    pub command: AccountingCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum AccountingCommand {
    /// Usage summed over the records whose VM stopped in the period.
    Report(ReportArgs),
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The report API: `http://HOST:PORT`, or `https://…` with `--ca`.
    #[arg(long)]
    pub addr: String,
    /// PEM CA that signed the server's certificate (TLS).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate (mTLS), with `--key`.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM key of `--cert`.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// First day (UTC, `YYYY-MM-DD`), inclusive.
    #[arg(long)]
    pub from: String,
    /// Last day (UTC, `YYYY-MM-DD`), exclusive.
    #[arg(long)]
    pub to: String,
    /// Row keys, comma-separated, in column order: vo, user, queue, day, month. `none`: one
    /// total row.
    #[arg(long, default_value = "vo")]
    pub by: String,
    /// Only this VO.
    #[arg(long, default_value = "")]
    pub vo: String,
    /// Only this user.
    #[arg(long, default_value = "")]
    pub user: String,
    /// Only this queue.
    #[arg(long, default_value = "")]
    pub queue: String,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

pub async fn accounting(args: AccountingArgs) -> u8 {
    match args.command {
        AccountingCommand::Report(r) => report(r).await,
    }
}

/// `YYYY-MM-DD` (UTC midnight) as a timestamp.
fn day(what: &str, v: &str) -> Result<prost_types::Timestamp, String> {
    let bad = || format!("--{what} {v:?}: expected YYYY-MM-DD");
    let fmt =
        time::format_description::parse_borrowed::<2>("[year]-[month]-[day]").map_err(|_| bad())?;
    let d = time::Date::parse(v, &fmt).map_err(|_| bad())?;
    Ok(prost_types::Timestamp {
        seconds: d.midnight().assume_utc().unix_timestamp(),
        nanos: 0,
    })
}

/// `--by` as report keys, with their column names.
fn keys(by: &str) -> Result<Vec<(ReportKey, &'static str)>, String> {
    if by == "none" {
        return Ok(Vec::new());
    }
    by.split(',')
        .map(|k| match k.trim() {
            "vo" => Ok((ReportKey::Vo, "vo")),
            "user" => Ok((ReportKey::User, "user")),
            "queue" => Ok((ReportKey::Queue, "queue")),
            "day" => Ok((ReportKey::Day, "day")),
            "month" => Ok((ReportKey::Month, "month")),
            other => Err(format!(
                "--by: unknown key {other:?} (vo, user, queue, day, month, or none)"
            )),
        })
        .collect()
}

async fn channel(a: &ReportArgs) -> Result<Channel, String> {
    let mut ep = Endpoint::from_shared(a.addr.clone())
        .map_err(|e| format!("--addr {:?}: {e}", a.addr))?
        .connect_timeout(std::time::Duration::from_secs(10));
    if a.ca.is_some() || a.addr.starts_with("https://") {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &a.ca {
            tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(c), Some(k)) = (&a.cert, &a.key) {
            tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
        }
        ep = ep.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
    }
    ep.connect().await.map_err(|e| {
        format!(
            "cannot reach the report API at {}: {}",
            a.addr,
            wnodes_bus::ErrorChain(&e)
        )
    })
}

async fn report(a: ReportArgs) -> u8 {
    let request = || -> Result<(ReportRequest, Vec<&'static str>), String> {
        let by = keys(&a.by)?;
        Ok((
            ReportRequest {
                from: Some(day("from", &a.from)?),
                to: Some(day("to", &a.to)?),
                group_by: by.iter().map(|(k, _)| *k as i32).collect(),
                vo: a.vo.clone(),
                user: a.user.clone(),
                queue: a.queue.clone(),
            },
            by.into_iter().map(|(_, n)| n).collect(),
        ))
    };
    let (req, columns) = match request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wnodesctl: {e}");
            return USAGE;
        }
    };
    let channel = match channel(&a).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wnodesctl: {e}");
            return UNAVAILABLE;
        }
    };
    let rows = match AccountingClient::new(channel).report(req).await {
        Ok(r) => r.into_inner().rows,
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            eprintln!(
                "wnodesctl: the report API refused the request: {}",
                s.message()
            );
            return USAGE;
        }
        Err(s) => {
            eprintln!("wnodesctl: the report failed: {}", s.message());
            return UNAVAILABLE;
        }
    };
    print!("{}", render(&columns, &rows, a.format));
    0
}

/// The rows in `format`: JSON (an array of objects), CSV (a header line, RFC 4180 quoting) or
/// an aligned table (hours and GiB).
pub fn render(columns: &[&str], rows: &[ReportRow], format: Format) -> String {
    match format {
        Format::Json => {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    let mut o = serde_json::Map::new();
                    for (c, k) in columns.iter().zip(&r.keys) {
                        o.insert((*c).to_owned(), k.clone().into());
                    }
                    o.insert("jobs".into(), r.jobs.into());
                    o.insert("wall_seconds".into(), r.wall_seconds.into());
                    o.insert("cpu_seconds".into(), r.cpu_seconds.into());
                    o.insert("core_seconds".into(), r.core_seconds.into());
                    o.insert(
                        "max_peak_memory_bytes".into(),
                        r.max_peak_memory_bytes.into(),
                    );
                    serde_json::Value::Object(o)
                })
                .collect();
            format!("{}\n", serde_json::Value::Array(v))
        }
        Format::Csv => {
            let quote = |s: &str| {
                if s.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", s.replace('"', "\"\""))
                } else {
                    s.to_owned()
                }
            };
            let mut out: Vec<String> = columns.iter().map(|c| (*c).to_owned()).collect();
            out.extend(
                [
                    "jobs",
                    "wall_seconds",
                    "cpu_seconds",
                    "core_seconds",
                    "max_peak_memory_bytes",
                ]
                .map(String::from),
            );
            let mut text = format!("{}\n", out.join(","));
            for r in rows {
                let mut cells: Vec<String> = r.keys.iter().map(|k| quote(k)).collect();
                cells.push(r.jobs.to_string());
                cells.push(r.wall_seconds.to_string());
                cells.push(r.cpu_seconds.to_string());
                cells.push(r.core_seconds.to_string());
                cells.push(r.max_peak_memory_bytes.to_string());
                text.push_str(&cells.join(","));
                text.push('\n');
            }
            text
        }
        Format::Table => {
            let mut header: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
            header.extend(["JOBS", "WALL_H", "CPU_H", "CORE_H", "MAX_PEAK_GIB"].map(String::from));
            let mut lines = vec![header];
            for r in rows {
                let mut cells = r.keys.clone();
                cells.push(r.jobs.to_string());
                cells.push(format!("{:.2}", r.wall_seconds / 3600.0));
                cells.push(format!("{:.2}", r.cpu_seconds / 3600.0));
                cells.push(format!("{:.2}", r.core_seconds / 3600.0));
                cells.push(format!(
                    "{:.2}",
                    r.max_peak_memory_bytes as f64 / (1u64 << 30) as f64
                ));
                lines.push(cells);
            }
            let widths: Vec<usize> = (0..lines[0].len())
                .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
                .collect();
            let key_cols = columns.len();
            let mut text = String::new();
            for l in &lines {
                let cells: Vec<String> = l
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        if i < key_cols {
                            format!("{c:<w$}", w = widths[i])
                        } else {
                            format!("{c:>w$}", w = widths[i])
                        }
                    })
                    .collect();
                text.push_str(cells.join("  ").trim_end());
                text.push('\n');
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<ReportRow> {
        vec![
            ReportRow {
                keys: vec!["atlas".into(), "2026-11".into()],
                jobs: 2,
                wall_seconds: 7200.0,
                cpu_seconds: 3600.0,
                core_seconds: 14_400.0,
                max_peak_memory_bytes: 2 << 30,
            },
            ReportRow {
                keys: vec!["cms, \"x\"".into(), "2026-11".into()],
                jobs: 1,
                wall_seconds: 60.0,
                cpu_seconds: 30.0,
                core_seconds: 60.0,
                max_peak_memory_bytes: 1 << 20,
            },
        ]
    }

    #[test]
    fn each_format_renders_every_row_and_column() {
        let cols = ["vo", "month"];
        let table = render(&cols, &rows(), Format::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("VO"), "{table}");
        assert!(
            lines[1].contains("atlas") && lines[1].contains("2.00"),
            "{table}"
        );
        let csv = render(&cols, &rows(), Format::Csv);
        assert_eq!(
            csv.lines().next(),
            Some("vo,month,jobs,wall_seconds,cpu_seconds,core_seconds,max_peak_memory_bytes")
        );
        assert!(
            csv.contains("\"cms, \"\"x\"\"\",2026-11,1,60,30,60,1048576"),
            "{csv}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&cols, &rows(), Format::Json)).unwrap();
        assert_eq!(json[0]["vo"], "atlas");
        assert_eq!(json[0]["jobs"], 2);
        assert_eq!(json[1]["core_seconds"], 60.0);
    }

    #[test]
    fn keys_and_days_are_checked() {
        assert_eq!(keys("vo,month").unwrap().len(), 2);
        assert!(keys("none").unwrap().is_empty());
        assert!(keys("vo,host").unwrap_err().contains("\"host\""));
        assert_eq!(day("from", "2026-11-01").unwrap().seconds, 1_793_491_200);
        assert!(day("from", "2026-13-01").unwrap_err().contains("--from"));
    }
}
