//! [`ApelConfig`]: what APEL needs that a usage record does not say.

use serde::{Deserialize, Serialize};

use crate::ApelError;

/// The site's APEL settings (the accounting service's `[accounting.apel]` section).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApelConfig {
    /// The GOCDB site name (`Site`, `SiteName`); default: the usage record's site.
    pub site_name: Option<String>,
    /// `SubmitHost` (the CE id, e.g. `ce01.example.org:9619/ce01.example.org-condor`); omitted
    /// (`None`) when unset.
    pub submit_host: Option<String>,
    /// `InfrastructureDescription` (e.g. `APEL-HTCONDORCE-HTCONDOR`); omitted when unset.
    pub infrastructure_description: Option<String>,
    /// `CloudComputeService` of cloud records (the GOCDB service); omitted when unset.
    pub cloud_compute_service: Option<String>,
    /// The benchmark of the site's hosts, per core. Job records carry it as `ServiceLevel`, cloud
    /// records as `Benchmark`; summaries need it (normalised durations are mandatory).
    pub benchmark: Option<Benchmark>,
}

/// A benchmark score per core.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Benchmark {
    pub kind: BenchmarkKind,
    /// Score per core (HS06, HEPscore23 or SpecInt2000 units).
    pub per_core: f64,
}

/// The benchmarks APEL knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchmarkKind {
    Hepspec06,
    Hepscore23,
    Si2k,
}

impl BenchmarkKind {
    /// As in the configuration: `hepspec06`, `hepscore23`, `si2k`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hepspec06 => "hepspec06",
            Self::Hepscore23 => "hepscore23",
            Self::Si2k => "si2k",
        }
    }

    /// The kind `name` names.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Hepspec06, Self::Hepscore23, Self::Si2k]
            .into_iter()
            .find(|k| k.name() == name)
    }

    /// The job record's `ServiceLevelType` (APEL accepts `si2k`, `hepspec`, `hepscore23` in any case).
    pub fn service_level_type(self) -> &'static str {
        match self {
            Self::Hepspec06 => "HEPSPEC",
            Self::Hepscore23 => "HEPscore23",
            Self::Si2k => "Si2k",
        }
    }

    /// The cloud record's `BenchmarkType` (free text in APEL; cASO writes `HEPSPEC06`).
    pub fn cloud_benchmark_type(self) -> &'static str {
        match self {
            Self::Hepspec06 => "HEPSPEC06",
            Self::Hepscore23 => "HEPscore23",
            Self::Si2k => "Si2k",
        }
    }
}

impl Benchmark {
    /// The factor a duration is multiplied by to normalise it, as APEL's server does
    /// (`schemas/server.sql`): the score per core, SpecInt2000 divided by 250 into HS06.
    /// HEPscore23 shares HS06's scale (WLCG MB, December 2022).
    pub fn normalisation_factor(self) -> f64 {
        match self.kind {
            BenchmarkKind::Si2k => self.per_core / 250.0,
            BenchmarkKind::Hepspec06 | BenchmarkKind::Hepscore23 => self.per_core,
        }
    }
}

impl ApelConfig {
    /// Checks the values the writers rely on.
    ///
    /// # Errors
    /// [`ApelError::Config`] naming the bad value.
    pub fn validate(&self) -> Result<(), ApelError> {
        if let Some(b) = self.benchmark
            && !(b.per_core.is_finite() && b.per_core > 0.0)
        {
            return Err(ApelError::Config(format!(
                "benchmark per_core {} must be a positive number",
                b.per_core
            )));
        }
        for (name, value) in [
            ("site_name", &self.site_name),
            ("submit_host", &self.submit_host),
            (
                "infrastructure_description",
                &self.infrastructure_description,
            ),
            ("cloud_compute_service", &self.cloud_compute_service),
        ] {
            if let Some(v) = value
                && (v.is_empty() || v.contains(['\n', '\r']))
            {
                return Err(ApelError::Config(format!(
                    "{name} must be a non-empty single line"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si2k_normalises_by_250_and_a_bad_benchmark_is_refused() {
        let b = Benchmark {
            kind: BenchmarkKind::Si2k,
            per_core: 2500.0,
        };
        assert_eq!(b.normalisation_factor(), 10.0);
        let c = ApelConfig {
            benchmark: Some(Benchmark {
                kind: BenchmarkKind::Hepspec06,
                per_core: 0.0,
            }),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("per_core"));
        let c = ApelConfig {
            submit_host: Some("a\nb".into()),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("submit_host")
        );
    }
}
