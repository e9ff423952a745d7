//! The job's payload script, handed to the guest as `opt/wnodes/job.sh` through fw_cfg.

use wnodes_proto::v1::{JobPayload, job_payload};

use super::QemuError;

/// Quotes `s` for POSIX sh: single quotes, each `'` written as `'\''`.
pub fn sh_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

fn no_nul(what: &str, s: &str) -> Result<(), QemuError> {
    if s.contains('\0') {
        return Err(QemuError::Payload(format!("{what} contains a NUL byte")));
    }
    Ok(())
}

/// The script the guest runs: environment exports, `cd` to the working directory, then the
/// inline script verbatim or the command (`exec` with every word single-quoted).
pub fn payload_script(payload: &JobPayload) -> Result<Vec<u8>, QemuError> {
    let mut head = String::new();
    for (name, value) in &payload.environment {
        let valid = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(QemuError::Payload(format!(
                "environment variable name {name:?} is not a valid shell name"
            )));
        }
        no_nul("an environment value", value)?;
        head.push_str(&format!("export {name}={}\n", sh_quote(value)));
    }
    if !payload.working_dir.is_empty() {
        no_nul("the working directory", &payload.working_dir)?;
        head.push_str(&format!(
            "cd {} || exit 125\n",
            sh_quote(&payload.working_dir)
        ));
    }
    match &payload.kind {
        Some(job_payload::Kind::InlineScript(script)) => {
            let mut out = head.into_bytes();
            out.extend_from_slice(script);
            if !script.ends_with(b"\n") {
                out.push(b'\n');
            }
            Ok(out)
        }
        Some(job_payload::Kind::Command(cmd)) => {
            if cmd.executable.is_empty() {
                return Err(QemuError::Payload("the command has no executable".into()));
            }
            let mut line = String::from("exec");
            for word in std::iter::once(&cmd.executable).chain(&cmd.args) {
                no_nul("a command argument", word)?;
                line.push(' ');
                line.push_str(&sh_quote(word));
            }
            Ok(format!("{head}{line}\n").into_bytes())
        }
        Some(job_payload::Kind::ScriptRef(_)) => Err(QemuError::Payload(
            "script_ref payloads are not supported".into(),
        )),
        None => Err(QemuError::Payload("the job has no payload".into())),
    }
}
