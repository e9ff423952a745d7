//! The kernel NFS server, through nfs-utils' `exportfs` (sites whose hypervisors run nfsd).
//!
//! ```text
//! add     exportfs -i -o rw|ro,sync,no_subtree_check,all_squash,anonuid=U,anongid=G,sec=sys,fsid=ID CLIENT:PATH
//! remove  exportfs -u CLIENT:PATH
//! list    exportfs -v        (parsed by [`parse_exportfs_v`]; entries whose fsid is in the range)
//! ```
//!
//! `-i` ignores `/etc/exports`: an export is exactly what the gateway asked for. `exportfs`
//! keeps its table in `/var/lib/nfs/etab` and tells a running nfsd; where no nfsd runs (these
//! development machines) the table is still kept, which is what the tests exercise.

use std::path::{Path, PathBuf};

use super::{NfsConfig, NfsError, NfsExport, Present, run};
use crate::config::IdRange;

/// The kernel backend.
#[derive(Debug, Clone)]
pub struct Exportfs {
    pub exportfs: PathBuf,
    pub ids: IdRange,
}

impl Exportfs {
    pub fn new(cfg: &NfsConfig) -> Self {
        Self {
            exportfs: cfg.exportfs.exportfs.clone(),
            ids: cfg.ids().unwrap_or(IdRange {
                first: 100,
                last: 9999,
            }),
        }
    }

    /// `exportfs` arguments that export `e`.
    pub fn add_args(e: &NfsExport) -> Vec<String> {
        let access = if e.read_only { "ro" } else { "rw" };
        vec![
            "-i".into(),
            "-o".into(),
            format!(
                "{access},sync,no_subtree_check,all_squash,anonuid={},anongid={},sec=sys,fsid={}",
                e.uid, e.gid, e.id
            ),
            format!("{}:{}", e.client, e.path.display()),
        ]
    }

    /// `exportfs` arguments that withdraw `path` from `client`.
    pub fn remove_args(client: &str, path: &Path) -> Vec<String> {
        vec!["-u".into(), format!("{client}:{}", path.display())]
    }

    pub async fn add(&self, e: &NfsExport) -> Result<(), NfsError> {
        run(&self.exportfs, &Self::add_args(e), &[], "export").await?;
        Ok(())
    }

    /// Withdraws every client's export of `path` under fsid `id` (what [`Self::add`] made).
    pub async fn remove(&self, id: u16, path: &Path) -> Result<(), NfsError> {
        for p in self.list().await? {
            if p.id == id && p.path == path {
                let client = p.client.unwrap_or_default();
                run(
                    &self.exportfs,
                    &Self::remove_args(&client, path),
                    &[],
                    "unexport",
                )
                .await?;
            }
        }
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<Present>, NfsError> {
        let text = run(&self.exportfs, &["-v".into()], &[], "list").await?;
        Ok(present(&text, self.ids))
    }
}

/// The exports of an `exportfs -v` text whose `fsid` lies in `ids`.
pub fn present(text: &str, ids: IdRange) -> Vec<Present> {
    parse_exportfs_v(text)
        .into_iter()
        .filter_map(|e| {
            let id = e.option("fsid")?.parse::<u16>().ok()?;
            ids.contains(u32::from(id)).then(|| Present {
                id,
                path: PathBuf::from(&e.path),
                client: Some(e.client.clone()),
            })
        })
        .collect()
}

/// One line of `exportfs -v`: a path, a client and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelExport {
    pub path: String,
    pub client: String,
    pub options: Vec<String>,
}

impl KernelExport {
    /// The value of `key=value` among the options.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    }
}

/// Parses `exportfs -v`: `PATH<ws>CLIENT(OPTIONS)` per line, or, for a long path, the path on
/// its own line and the client on the next, indented. A line that fits neither is skipped.
pub fn parse_exportfs_v(text: &str) -> Vec<KernelExport> {
    let mut out = Vec::new();
    let mut pending: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let indented = line.starts_with([' ', '\t']);
        let trimmed = line.trim();
        let client_part = trimmed
            .rsplit_once([' ', '\t'])
            .map_or(trimmed, |(_, last)| last);
        let client = parse_client(client_part);
        match (indented, client) {
            (true, Some((client, options))) => {
                if let Some(path) = pending.take() {
                    out.push(KernelExport {
                        path,
                        client,
                        options,
                    });
                }
            }
            (false, Some((client, options))) if client_part.len() < trimmed.len() => {
                let path = trimmed[..trimmed.len() - client_part.len()].trim_end();
                out.push(KernelExport {
                    path: path.to_owned(),
                    client,
                    options,
                });
                pending = None;
            }
            (false, _) => pending = Some(trimmed.to_owned()),
            (true, None) => pending = None,
        }
    }
    out
}

/// `CLIENT(opt,opt,…)`.
fn parse_client(s: &str) -> Option<(String, Vec<String>)> {
    let (client, rest) = s.split_once('(')?;
    let opts = rest.strip_suffix(')')?;
    if client.is_empty() {
        return None;
    }
    Some((
        client.to_owned(),
        opts.split(',')
            .filter(|o| !o.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exportfs -v` of nfs-utils 2.6.2 (Debian 12), captured on a development machine after two
    /// `exportfs -i -o …` calls: a short path on one line, a long one on two.
    const EXPORTFS_V: &str = include_str!("../../tests/fixtures/exportfs-v.txt");

    #[test]
    fn exportfs_v_is_parsed_with_short_and_long_paths() {
        let e = parse_exportfs_v(EXPORTFS_V);
        assert_eq!(e.len(), 3, "{e:#?}");
        assert_eq!(e[0].path, "/tmp/exp/a");
        assert_eq!(e[0].client, "10.231.1.2");
        assert_eq!(e[0].option("anonuid"), Some("1000"));
        assert_eq!(e[0].option("fsid"), Some("101"));
        assert_eq!(
            e[1].path,
            "/srv/wnodes/exports/a-rather-long-directory-name-for-wrapping"
        );
        assert_eq!(e[1].client, "10.231.1.3");
        assert_eq!(e[1].option("fsid"), Some("102"));
        assert!(e[1].options.iter().any(|o| o == "ro"));
        assert_eq!(e[2].path, "/srv/wnodes");
        assert_eq!(e[2].client, "<world>");
        assert_eq!(e[2].option("fsid"), None);
        // Garbage is skipped, not fatal.
        assert!(parse_exportfs_v("nonsense\n\t(no client)\n").is_empty());
    }

    #[test]
    fn command_lines_export_to_one_client_squashed_to_the_job() {
        let e = NfsExport {
            id: 101,
            vm_id: "vm-000000000001".into(),
            path: "/srv/gpfs/alice".into(),
            client: "10.231.1.2".parse().unwrap(),
            uid: 1000,
            gid: 100,
            read_only: false,
        };
        assert_eq!(
            Exportfs::add_args(&e),
            [
                "-i",
                "-o",
                "rw,sync,no_subtree_check,all_squash,anonuid=1000,anongid=100,sec=sys,fsid=101",
                "10.231.1.2:/srv/gpfs/alice"
            ]
        );
        let ro = NfsExport {
            read_only: true,
            ..e
        };
        assert!(Exportfs::add_args(&ro)[2].starts_with("ro,"));
        assert_eq!(
            Exportfs::remove_args("10.231.1.2", Path::new("/srv/gpfs/alice")),
            ["-u", "10.231.1.2:/srv/gpfs/alice"]
        );
    }
}
