//! Host policy on a path an event names: where it really leads (every symlink and `..`
//! resolved) must lie under one of the host's configured roots (themselves resolved). The
//! gateway's exports and the launcher's images and scratch volumes go through this one check;
//! each service names its own rules and adds what kind of file it needs.

use std::path::{Path, PathBuf};

/// Why a path is refused.
#[derive(Debug)]
pub enum PathRefusal {
    /// Not an absolute path.
    NotAbsolute,
    /// It cannot be resolved (it does not exist, or a component cannot be read).
    Unresolvable(std::io::Error),
    /// None of the configured roots exists on this host.
    NoRoot,
    /// It leads outside every root; `real` is where it leads.
    Outside { real: PathBuf },
}

/// `path` with every symlink and `..` resolved, when that lies under one of `roots`.
pub fn resolve_under(path: &str, roots: &[PathBuf]) -> Result<PathBuf, PathRefusal> {
    if !Path::new(path).is_absolute() {
        return Err(PathRefusal::NotAbsolute);
    }
    let real = std::fs::canonicalize(path).map_err(PathRefusal::Unresolvable)?;
    let roots: Vec<PathBuf> = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    if roots.is_empty() {
        return Err(PathRefusal::NoRoot);
    }
    if roots.iter().any(|r| real.starts_with(r)) {
        Ok(real)
    } else {
        Err(PathRefusal::Outside { real })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_dots_are_followed_before_the_roots_are_compared() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        let roots = [root.clone()];
        let p = |rel: &str| root.join(rel).display().to_string();
        assert_eq!(
            resolve_under(&p("a"), &roots).unwrap(),
            root.join("a").canonicalize().unwrap()
        );
        assert!(matches!(
            resolve_under(&p("out"), &roots),
            Err(PathRefusal::Outside { real }) if real == Path::new("/etc")
        ));
        assert!(matches!(
            resolve_under(&p("a/../.."), &roots),
            Err(PathRefusal::Outside { .. })
        ));
        assert!(matches!(
            resolve_under("a", &roots),
            Err(PathRefusal::NotAbsolute)
        ));
        assert!(matches!(
            resolve_under(&p("missing"), &roots),
            Err(PathRefusal::Unresolvable(_))
        ));
        assert!(matches!(
            resolve_under(&p("a"), &[dir.path().join("no-such-root")]),
            Err(PathRefusal::NoRoot)
        ));
    }
}
