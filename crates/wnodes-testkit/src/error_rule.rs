//! The error rule, as a test: an error's `Display` never repeats its `source()`
//! (`docs/errors-and-logging.md`).
//!
//! [`error_rule!`](crate::error_rule!) takes, per error type, one `pattern => sample` arm per
//! variant. It generates a `#[test]` that
//!
//! - matches every listed type with exactly those patterns and no wildcard, so adding a variant
//!   without adding its sample fails to compile (`non-exhaustive patterns`);
//! - checks that each sample is the variant its pattern names;
//! - runs [`check`] on every sample: the message is not empty and does not contain the message
//!   of its `source()`.
//!
//! ```ignore
//! #[cfg(test)]
//! mod error_rule {
//!     use super::*;
//!     use wnodes_testkit::error_rule::io_source;
//!
//!     wnodes_testkit::error_rule! {
//!         MyError {
//!             MyError::Open { .. } => MyError::Open { path: "/x".into(), source: io_source() },
//!             MyError::Empty => MyError::Empty,
//!         }
//!         MyStructError {
//!             MyStructError { .. } => MyStructError { field: "f".into() },
//!         }
//!     }
//! }
//! ```
//!
//! Patterns must not bind names (use `..` and `_`). Give constructed sources a distinctive text
//! (as [`io_source`] does), so that "the message contains the source's text" cannot be true by
//! accident.
//!
//! Each crate keeps its invocation in `src/error_rule.rs` (`#[cfg(test)] mod error_rule;` in its
//! `lib.rs`, so private types are reachable). A test of this crate reads the workspace's sources
//! and fails when a type deriving `thiserror::Error` has no entry in its crate's
//! `src/error_rule.rs`, so a new type cannot be forgotten either.

use std::error::Error;

/// The text of every source this module builds: distinctive, so a message that repeats it is
/// caught and one that does not is never flagged by coincidence.
pub const SOURCE_TEXT: &str = "injected source error 4f1c";

/// An `io::Error` whose text is [`SOURCE_TEXT`].
pub fn io_source() -> std::io::Error {
    std::io::Error::other(SOURCE_TEXT)
}

/// A boxed error whose text is [`SOURCE_TEXT`], for `Box<dyn Error + Send + Sync>` sources.
pub fn boxed_source() -> Box<dyn Error + Send + Sync> {
    Box::new(io_source())
}

/// Checks every `(name, error)`: its message is not empty, and does not contain the message of
/// its `source()`. Only the first link is checked: the source is either another of our types,
/// checked with its own samples, or a dependency's error, whose rules are not ours (ErrorChain
/// copes with those). Panics listing every offender.
pub fn check(samples: &[(String, Box<dyn Error>)]) {
    let mut failures = Vec::new();
    for (name, err) in samples {
        let text = err.to_string();
        if text.trim().is_empty() {
            failures.push(format!("{name}: empty message"));
        }
        if let Some(source) = err.source() {
            let source_text = source.to_string();
            if source_text.trim().is_empty() {
                failures.push(format!(
                    "{name}: the sample's source has an empty message (give it a distinctive one)"
                ));
            } else if text.contains(&source_text) {
                failures.push(format!(
                    "{name}: the message repeats its source\n    message: {text}\n    source:  {source_text}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "the error rule is broken (docs/errors-and-logging.md: Display never repeats the source):\n  {}",
        failures.join("\n  ")
    );
}

/// Generates the error-rule test for a crate's error types; see the [module docs](self).
#[macro_export]
macro_rules! error_rule {
    ($( $ty:ty { $( $pat:pat => $sample:expr ),+ $(,)? } )+) => {
        #[test]
        fn every_error_variant_keeps_its_source_out_of_its_message() {
            let mut samples: ::std::vec::Vec<(
                ::std::string::String,
                ::std::boxed::Box<dyn ::std::error::Error>,
            )> = ::std::vec::Vec::new();
            $(
                {
                    // No wildcard: a variant without an arm here does not compile.
                    fn every_variant_has_a_sample(e: &$ty) {
                        match e {
                            $( $pat => {} )+
                        }
                    }
                    $(
                        let sample: $ty = $sample;
                        every_variant_has_a_sample(&sample);
                        assert!(
                            matches!(&sample, $pat),
                            "the sample for `{}` is another variant: {:?}",
                            stringify!($pat),
                            sample,
                        );
                        samples.push((
                            ::std::format!("{} ({})", stringify!($pat), stringify!($ty)),
                            ::std::boxed::Box::new(sample),
                        ));
                    )+
                }
            )+
            $crate::error_rule::check(&samples);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Good {
        #[error("cannot open {path}")]
        Open {
            path: String,
            #[source]
            source: std::io::Error,
        },
        #[error("nothing to do")]
        Empty,
    }

    #[derive(Debug, thiserror::Error)]
    enum Bad {
        #[error("cannot open {path}: {source}")]
        Open {
            path: String,
            #[source]
            source: std::io::Error,
        },
    }

    /// Transparent forwards both `Display` and `source()`: a wrapper of a repeating error repeats.
    #[derive(Debug, thiserror::Error)]
    #[error(transparent)]
    struct Wrapper(Bad);

    crate::error_rule! {
        Good {
            Good::Open { .. } => Good::Open { path: "/x".into(), source: io_source() },
            Good::Empty => Good::Empty,
        }
    }

    /// The panic message of `check` on `e` alone; panics itself when `check` passes.
    fn failure(e: impl Error + 'static) -> String {
        let samples: Vec<(String, Box<dyn Error>)> = vec![("sample".to_owned(), Box::new(e))];
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&samples)))
            .expect_err("check passed");
        panic.downcast_ref::<String>().cloned().unwrap_or_default()
    }

    #[test]
    fn a_message_that_repeats_its_source_fails() {
        let bad = Bad::Open {
            path: "/x".into(),
            source: io_source(),
        };
        let msg = failure(bad);
        assert!(msg.contains("the message repeats its source"), "{msg}");
    }

    #[test]
    fn a_transparent_wrapper_of_a_repeating_error_fails() {
        let wrapper = Wrapper(Bad::Open {
            path: "/x".into(),
            source: io_source(),
        });
        let msg = failure(wrapper);
        assert!(msg.contains("the message repeats its source"), "{msg}");
    }

    #[test]
    fn an_empty_message_fails() {
        #[derive(Debug, thiserror::Error)]
        #[error("")]
        struct Empty;
        let msg = failure(Empty);
        assert!(msg.contains("empty message"), "{msg}");
    }

    /// Names of the types deriving `thiserror::Error` in `text`, outside its inline test module
    /// (from a `#[cfg(test)]` followed by `mod name {` to the end of the file).
    fn error_types(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut derives = false;
        let mut cfg_test = false;
        for line in text.lines().map(str::trim) {
            if cfg_test && line.starts_with("mod ") && line.ends_with('{') {
                break;
            }
            cfg_test = line == "#[cfg(test)]";
            if line.starts_with("#[derive(") && line.contains("thiserror::Error") {
                derives = true;
            } else if derives && !line.starts_with("#[") && !line.starts_with("///") {
                let words: Vec<&str> = line.split_whitespace().collect();
                let at = words.iter().position(|w| *w == "enum" || *w == "struct");
                let name = at.and_then(|i| words.get(i + 1)).map(|w| {
                    w.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                });
                names.push(name.unwrap_or_else(|| panic!("no type after the derive: {line}")));
                derives = false;
            }
        }
        names
    }

    fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn every_error_type_in_the_workspace_has_samples() {
        // At run time first: nextest sets it to the remapped workspace when it runs an archive.
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
            || env!("CARGO_MANIFEST_DIR").into(),
            std::path::PathBuf::from,
        );
        let root = manifest_dir.join("../..");
        let mut missing = Vec::new();
        let mut found = 0;
        for group in ["crates", "services"] {
            for krate in std::fs::read_dir(root.join(group)).unwrap() {
                let src = krate.unwrap().path().join("src");
                if !src.is_dir() {
                    continue;
                }
                let mut files = Vec::new();
                rust_files(&src, &mut files);
                let rule = std::fs::read_to_string(src.join("error_rule.rs")).unwrap_or_default();
                for file in files {
                    let text = std::fs::read_to_string(&file).unwrap();
                    assert!(
                        !text
                            .lines()
                            .any(|l| l.trim_start().starts_with("use thiserror")),
                        "{}: derive `thiserror::Error` by its full path (this test looks for it)",
                        file.display()
                    );
                    for name in error_types(&text) {
                        found += 1;
                        // `Name {` or, for a generic type, `Name<Args> {`.
                        let sampled = rule.lines().map(str::trim).any(|l| {
                            l.strip_prefix(name.as_str()).is_some_and(|rest| {
                                rest == " {" || (rest.starts_with('<') && rest.ends_with("> {"))
                            })
                        });
                        if !sampled {
                            missing.push(format!("{name} ({})", file.display()));
                        }
                    }
                }
            }
        }
        assert!(
            found >= 29,
            "found only {found} error types: is the scan broken?"
        );
        assert!(
            missing.is_empty(),
            "error types without samples in their crate's src/error_rule.rs:\n  {}",
            missing.join("\n  ")
        );
    }

    #[test]
    fn the_scan_finds_derived_error_types() {
        let text = "#[derive(Debug, thiserror::Error)]\n/// Doc.\n#[error(\"x\")]\npub(crate) struct A(String);\n\
                    #[derive(Debug, Clone, thiserror::Error)]\nenum B {}\n#[cfg(test)]\nmod x;\n\
                    #[derive(thiserror::Error)]\nenum C {}\n#[cfg(test)]\nmod tests {\n\
                    #[derive(Debug, thiserror::Error)]\nenum InTests {}\n}\n";
        assert_eq!(error_types(text), ["A", "B", "C"]);
    }

    #[test]
    fn a_good_chain_passes() {
        let good: Vec<(String, Box<dyn Error>)> = vec![(
            "good".to_owned(),
            Box::new(Good::Open {
                path: "/x".into(),
                source: io_source(),
            }),
        )];
        check(&good);
    }
}
