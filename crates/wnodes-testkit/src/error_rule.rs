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
