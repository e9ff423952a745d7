//! The registry of the sections of WNoDeS's one configuration file.
//!
//! One TOML file (and one environment file) serves every WNoDeS program: the keys every service
//! shares sit at the top level (`site`, `host`, `[nats]`, ...; owned by `wnodes-runtime`), and each
//! program reads its own section (`[launcher]`, `[network]`, ...) and accepts the others' without
//! reading them. A top-level key that is neither a common key nor a registered section is a typo
//! (`[lancher]`), and every program rejects it.
//!
//! A program contributes its section by adding one [`Section`] to [`SECTIONS`]; its
//! `wnodes_runtime::Service` implementation names the same section, and the runtime refuses to
//! start a service whose section is not registered here (so the two cannot drift apart). This
//! crate has no dependencies and no code but the list: adding a service does not touch the runtime.

/// Who owns a configuration section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A service binary `wnodes-<section>`.
    Service,
    /// A development or test tool (not deployed at a site).
    Tool,
}

/// One registered section of the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    /// The section's name: the TOML table `[name]` and the environment prefix `WNODES_<NAME>__`.
    pub name: &'static str,
    /// The crate that defines the section's type.
    pub crate_name: &'static str,
    pub owner: Owner,
}

const fn service(name: &'static str, crate_name: &'static str) -> Section {
    Section {
        name,
        crate_name,
        owner: Owner::Service,
    }
}

/// Every registered section.
pub const SECTIONS: &[Section] = &[
    service("bridge", "wnodes-bridge"),
    service("launcher", "wnodes-launcher"),
    service("image", "wnodes-image"),
    service("scratch", "wnodes-scratch"),
    service("network", "wnodes-network"),
    service("gateway", "wnodes-gateway"),
    service("accounting", "wnodes-accounting"),
    service("usage", "wnodes-usage"),
    service("agent", "wnodes-agent"),
    Section {
        name: "node",
        crate_name: "wnodes-integration-tests (bus-node)",
        owner: Owner::Tool,
    },
    Section {
        name: "bench",
        crate_name: "wnodes-bench",
        owner: Owner::Tool,
    },
];

/// The registered section called `name`.
pub fn find(name: &str) -> Option<&'static Section> {
    SECTIONS.iter().find(|s| s.name == name)
}

/// The names of the registered sections, comma-separated (for error messages).
pub fn names() -> String {
    SECTIONS
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_lowercase_tokens() {
        for (i, s) in SECTIONS.iter().enumerate() {
            assert!(
                !s.name.is_empty() && s.name.bytes().all(|b| b.is_ascii_lowercase()),
                "{s:?}"
            );
            assert!(
                SECTIONS[i + 1..].iter().all(|o| o.name != s.name),
                "{} registered twice",
                s.name
            );
        }
        assert_eq!(find("launcher").map(|s| s.owner), Some(Owner::Service));
        assert_eq!(find("lancher"), None);
        assert!(names().contains("gateway, accounting"));
    }
}
