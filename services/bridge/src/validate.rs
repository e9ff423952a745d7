//! Input checks shared by the gRPC service and `submit`: each failure names the field.

use wnodes_bus::{proto, subject};

/// A field that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct InvalidInput {
    /// Dotted path of the field, e.g. `job.run.job_id`.
    pub field: String,
    pub why: String,
}

fn invalid(field: &str, why: impl Into<String>) -> InvalidInput {
    InvalidInput {
        field: field.to_owned(),
        why: why.into(),
    }
}

/// A key part (site, job id) goes into run keys, event ids and `Nats-Msg-Id`: non-empty, no
/// `/` (the run-key separator), no whitespace or control characters, at most 128 bytes.
fn key_part(field: &str, value: &str) -> Result<(), InvalidInput> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > 128 {
        return Err(invalid(field, "must be at most 128 bytes"));
    }
    if value
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            field,
            format!("{value:?} must not contain '/', whitespace or control characters"),
        ));
    }
    Ok(())
}

/// Checks a run reference at `field` (e.g. `job.run`).
pub fn run(field: &str, run: Option<&proto::JobRunRef>) -> Result<(), InvalidInput> {
    let Some(run) = run else {
        return Err(invalid(field, "is required"));
    };
    key_part(&format!("{field}.site"), &run.site)?;
    key_part(&format!("{field}.job_id"), &run.job_id)?;
    if run.run_attempt == 0 {
        return Err(invalid(
            &format!("{field}.run_attempt"),
            "is 1-based; 0 is not a run attempt",
        ));
    }
    if proto::Lrms::try_from(run.lrms).is_err() {
        return Err(invalid(
            &format!("{field}.lrms"),
            format!("{} is not a known LRMS", run.lrms),
        ));
    }
    Ok(())
}

/// Checks a hypervisor host name at `field`.
pub fn host(field: &str, host: &str) -> Result<(), InvalidInput> {
    if host.is_empty() {
        return Err(invalid(field, "is required (the hypervisor's host name)"));
    }
    subject::validate_host(host).map_err(|e| invalid(field, e.to_string()))
}

/// Checks the job of a `JobStarted`.
pub fn job(job: Option<&proto::JobDescription>) -> Result<(), InvalidInput> {
    let Some(job) = job else {
        return Err(invalid("job", "is required"));
    };
    run("job.run", job.run.as_ref())?;
    host("job.host", &job.host)?;
    let payload = job.payload.as_ref().and_then(|p| p.kind.as_ref());
    match payload {
        None => {
            return Err(invalid(
                "job.payload",
                "is required (a command or a script)",
            ));
        }
        Some(proto::job_payload::Kind::Command(c)) if c.executable.is_empty() => {
            return Err(invalid(
                "job.payload.command.executable",
                "must not be empty",
            ));
        }
        Some(proto::job_payload::Kind::ScriptRef(s)) if s.uri.is_empty() => {
            return Err(invalid("job.payload.script_ref.uri", "must not be empty"));
        }
        Some(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> proto::JobDescription {
        proto::JobDescription {
            run: Some(proto::JobRunRef {
                site: "T1".into(),
                lrms: proto::Lrms::Htcondor as i32,
                job_id: "1.0".into(),
                run_attempt: 1,
            }),
            host: "hv1.example.org".into(),
            payload: Some(proto::JobPayload {
                kind: Some(proto::job_payload::Kind::InlineScript(b"true".to_vec())),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn names_the_field() {
        assert!(job(Some(&good())).is_ok());
        assert_eq!(job(None).unwrap_err().field, "job");
        let mut j = good();
        j.run.as_mut().unwrap().job_id.clear();
        assert_eq!(job(Some(&j)).unwrap_err().field, "job.run.job_id");
        let mut j = good();
        j.run.as_mut().unwrap().job_id = "a/b".into();
        assert_eq!(job(Some(&j)).unwrap_err().field, "job.run.job_id");
        let mut j = good();
        j.run.as_mut().unwrap().run_attempt = 0;
        assert_eq!(job(Some(&j)).unwrap_err().field, "job.run.run_attempt");
        let mut j = good();
        j.host.clear();
        assert_eq!(job(Some(&j)).unwrap_err().field, "job.host");
        let mut j = good();
        j.host = "Bad_Host".into();
        assert_eq!(job(Some(&j)).unwrap_err().field, "job.host");
        let mut j = good();
        j.payload = None;
        assert_eq!(job(Some(&j)).unwrap_err().field, "job.payload");
    }
}
