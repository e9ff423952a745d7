//! What HTCondor tells about one running job, read, for the host agent:
//!
//! - which slot a process runs in: its nearest ancestor `condor_starter` owned by root (the
//!   startd runs one starter per claimed slot with `-a <slot>`: [`slot_of_starter`]);
//! - that slot's ad from the collector: `condor_status -startd -json -constraint 'Name ==
//!   "<slot>@<host>"'` ([`slot_constraint`], [`parse_slot_json`]): the job it runs
//!   (`GlobalJobId`, `JobId`) and for whom (`RemoteOwner`);
//! - the job's ad from its schedd (named in `GlobalJobId`): `condor_q -name <schedd> -json
//!   <cluster.proc> -attributes ...` ([`CONDOR_Q_ATTRIBUTES`], [`parse_job_json`]): owner,
//!   status, `NumJobStarts` (the run attempt, as the bridge counts execute events), requested
//!   CPUs, memory and run time, accounting group and VO.
//!
//! The job's `.job.ad` in its sandbox is not read: the job's user can write it.

use serde_json::Value;

/// A slot's ad, as far as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAd {
    /// `slot1_1@wn01.example.org`.
    pub name: String,
    /// `schedd.example.org#123.0#1764668400`, when the slot runs a job.
    pub global_job_id: Option<String>,
    /// `RemoteOwner` (`user@uid.domain`).
    pub remote_owner: Option<String>,
    /// `Claimed`, `Unclaimed`, ...
    pub state: String,
}

/// A job's ad from its schedd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CondorJob {
    /// `cluster.proc`.
    pub job_id: String,
    pub global_job_id: String,
    pub owner: String,
    /// `JobStatus`: 2 running.
    pub status: i64,
    /// `NumJobStarts`.
    pub num_job_starts: u32,
    /// `RemoteHost`: the slot running it (`slot1_1@wn01.example.org`).
    pub remote_host: Option<String>,
    pub request_cpus: u32,
    /// `RequestMemory` (MiB) in bytes.
    pub request_memory_bytes: u64,
    /// `BatchRuntime` (seconds; set by HTCondor-CE's job router), else `MaxWallTimeMins`.
    pub max_runtime_secs: Option<u64>,
    /// `AcctGroup`, else the first part of `AccountingGroup`.
    pub accounting_group: Option<String>,
    /// `x509UserProxyVOName`, when the job carries a proxy.
    pub vo: Option<String>,
}

/// `JobStatus` of a running job.
pub const JOB_STATUS_RUNNING: i64 = 2;

/// The job attributes asked of `condor_q`.
pub const CONDOR_Q_ATTRIBUTES: &str = "ClusterId,ProcId,GlobalJobId,Owner,JobStatus,NumJobStarts,RemoteHost,RequestCpus,RequestMemory,BatchRuntime,MaxWallTimeMins,AcctGroup,AccountingGroup,x509UserProxyVOName";

/// The slot attributes asked of `condor_status`.
pub const CONDOR_STATUS_ATTRIBUTES: &str = "Name,GlobalJobId,RemoteOwner,State";

/// A name HTCondor puts in a constraint or a command line here: slot names, host names,
/// schedd names. Letters, digits, `_`, `-`, `.`, `@`; never a quote.
pub fn is_condor_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

/// The slot a `condor_starter` serves, from its arguments (`condor_starter -f -a slot1_1
/// <sinful>`; with the interpreter first when the starter is a script).
pub fn slot_of_starter(args: &[String]) -> Option<String> {
    let at = args.iter().position(|a| a == "-a")?;
    let slot = args.get(at + 1)?;
    (is_condor_name(slot) && !slot.contains('@')).then(|| slot.clone())
}

/// `condor_status`'s constraint for slot `slot` of host `host`; `None` when either is not a
/// plain name.
pub fn slot_constraint(slot: &str, host: &str) -> Option<String> {
    (is_condor_name(slot) && is_condor_name(host) && !slot.contains('@') && !host.contains('@'))
        .then(|| format!("Name == \"{slot}@{host}\""))
}

/// The schedd and `cluster.proc` of a `GlobalJobId` (`schedd#123.0#1764668400`).
pub fn split_global_job_id(g: &str) -> Option<(String, String)> {
    let mut parts = g.split('#');
    let (schedd, id, stamp) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !is_condor_name(schedd) || stamp.parse::<u64>().is_err() {
        return None;
    }
    let (cluster, proc_) = id.split_once('.')?;
    (cluster.parse::<u64>().is_ok() && proc_.parse::<u64>().is_ok())
        .then(|| (schedd.to_owned(), id.to_owned()))
}

/// The one ad of a `-json` answer (an array of objects).
fn one_ad(out: &str) -> Result<serde_json::Map<String, Value>, String> {
    let v: Value = serde_json::from_str(out.trim()).map_err(|e| format!("not JSON: {e}"))?;
    let ads = v.as_array().ok_or("not a JSON array of ads")?;
    match ads.as_slice() {
        [Value::Object(ad)] => Ok(ad.clone()),
        [_] => Err("the ad is not an object".into()),
        other => Err(format!("{} ads, expected one", other.len())),
    }
}

fn text(ad: &serde_json::Map<String, Value>, k: &str) -> Option<String> {
    ad.get(k)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn int(ad: &serde_json::Map<String, Value>, k: &str) -> Result<Option<i64>, String> {
    match ad.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| {
                // HTCondor prints some integers as reals (`RequestMemory` from an expression).
                #[allow(clippy::cast_possible_truncation)]
                n.as_f64()
                    .filter(|f| f.is_finite() && f.fract() == 0.0)
                    .map(|f| f as i64)
            })
            .map(Some)
            .ok_or_else(|| format!("{k} {n} is not an integer")),
        Some(other) => Err(format!("{k} {other} is not a number")),
    }
}

/// Reads `condor_status -startd -json -constraint ... -attributes ...`'s answer (one slot).
///
/// # Errors
/// Not JSON, not exactly one ad, no `Name`.
pub fn parse_slot_json(out: &str) -> Result<SlotAd, String> {
    let ad = one_ad(out)?;
    Ok(SlotAd {
        name: text(&ad, "Name").ok_or("no Name")?,
        global_job_id: text(&ad, "GlobalJobId"),
        remote_owner: text(&ad, "RemoteOwner"),
        state: text(&ad, "State").unwrap_or_default(),
    })
}

/// Reads `condor_q -json ID -attributes ...`'s answer (one job).
///
/// # Errors
/// Not JSON, not exactly one ad, an attribute missing or of the wrong type.
pub fn parse_job_json(out: &str) -> Result<CondorJob, String> {
    let ad = one_ad(out)?;
    let need = |k: &str| int(&ad, k)?.ok_or_else(|| format!("no {k}"));
    let cluster = need("ClusterId")?;
    let proc_ = need("ProcId")?;
    let nonneg_u32 =
        |k: &str, v: i64| u32::try_from(v).map_err(|_| format!("{k} {v} is out of range"));
    let starts = nonneg_u32("NumJobStarts", int(&ad, "NumJobStarts")?.unwrap_or(0))?;
    let cpus = nonneg_u32("RequestCpus", int(&ad, "RequestCpus")?.unwrap_or(1))?;
    let mem_mib = u64::try_from(int(&ad, "RequestMemory")?.unwrap_or(0))
        .map_err(|_| "RequestMemory is negative".to_owned())?;
    let runtime = match int(&ad, "BatchRuntime")? {
        Some(s) => Some(s),
        None => int(&ad, "MaxWallTimeMins")?.map(|m| m.saturating_mul(60)),
    }
    .map(|s| u64::try_from(s).map_err(|_| format!("run time {s} is negative")))
    .transpose()?;
    let group = text(&ad, "AcctGroup").or_else(|| {
        text(&ad, "AccountingGroup")
            .and_then(|g| g.split(['.', '@']).next().map(str::to_owned))
            .filter(|g| !g.is_empty())
    });
    Ok(CondorJob {
        job_id: format!("{cluster}.{proc_}"),
        global_job_id: text(&ad, "GlobalJobId").ok_or("no GlobalJobId")?,
        owner: text(&ad, "Owner").ok_or("no Owner")?,
        status: need("JobStatus")?,
        num_job_starts: starts,
        remote_host: text(&ad, "RemoteHost"),
        request_cpus: cpus.max(1),
        request_memory_bytes: mem_mib.saturating_mul(1 << 20),
        max_runtime_secs: runtime,
        accounting_group: group,
        vo: text(&ad, "x509UserProxyVOName"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOT: &str =
        include_str!("../tests/data/htcondor/condor_status_startd_json_CONSTRUCTED.json");
    const JOB: &str = include_str!("../tests/data/htcondor/condor_q_json_CONSTRUCTED.json");

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn the_slot_comes_from_the_starter_s_arguments() {
        assert_eq!(
            slot_of_starter(&args("condor_starter -f -a slot1_3 <10.0.0.5:9618?sock=x>"))
                .as_deref(),
            Some("slot1_3")
        );
        assert_eq!(
            slot_of_starter(&args("/bin/sh /usr/sbin/condor_starter -f -a slot2 x")).as_deref(),
            Some("slot2")
        );
        assert_eq!(slot_of_starter(&args("condor_starter -f")), None);
        assert_eq!(slot_of_starter(&args("condor_starter -a")), None);
        assert_eq!(slot_of_starter(&args("condor_starter -a x\"y")), None);
        assert_eq!(slot_of_starter(&args("condor_starter -a s@h")), None);
    }

    #[test]
    fn constraints_take_only_plain_names() {
        assert_eq!(
            slot_constraint("slot1_3", "wn01.example.org").as_deref(),
            Some("Name == \"slot1_3@wn01.example.org\"")
        );
        assert_eq!(slot_constraint("slot1\" || true || \"", "h"), None);
        assert_eq!(slot_constraint("slot1", "h@x"), None);
        assert_eq!(slot_constraint("", "h"), None);
        assert_eq!(
            split_global_job_id("ce01.example.org#4711.0#1764668400"),
            Some(("ce01.example.org".into(), "4711.0".into()))
        );
        assert_eq!(split_global_job_id("ce01#4711#1"), None);
        assert_eq!(split_global_job_id("ce 01#4711.0#1"), None);
        assert_eq!(split_global_job_id("ce01#4711.0#1#2"), None);
    }

    #[test]
    fn the_slot_ad_and_the_job_ad_are_read() {
        let s = parse_slot_json(SLOT).unwrap();
        assert_eq!(s.name, "slot1_3@wn01.example.org");
        assert_eq!(
            s.global_job_id.as_deref(),
            Some("ce01.example.org#4711.0#1764668400")
        );
        assert_eq!(s.remote_owner.as_deref(), Some("cms042@example.org"));
        assert_eq!(s.state, "Claimed");

        let j = parse_job_json(JOB).unwrap();
        assert_eq!(j.job_id, "4711.0");
        assert_eq!(j.global_job_id, "ce01.example.org#4711.0#1764668400");
        assert_eq!(j.owner, "cms042");
        assert_eq!(j.status, JOB_STATUS_RUNNING);
        assert_eq!(j.num_job_starts, 2);
        assert_eq!(j.remote_host.as_deref(), Some("slot1_3@wn01.example.org"));
        assert_eq!(j.request_cpus, 4);
        assert_eq!(j.request_memory_bytes, 8000 << 20);
        assert_eq!(j.max_runtime_secs, Some(172_800));
        assert_eq!(j.accounting_group.as_deref(), Some("group_cms"));
        assert_eq!(j.vo.as_deref(), Some("cms"));

        assert!(parse_job_json("[]").unwrap_err().contains("0 ads"));
        assert!(parse_job_json("[{}]").unwrap_err().contains("ClusterId"));
        assert!(parse_slot_json("{}").is_err());
        let bad = JOB.replace("\"NumJobStarts\": 2", "\"NumJobStarts\": -1");
        assert!(parse_job_json(&bad).unwrap_err().contains("NumJobStarts"));
        let real = JOB.replace("\"RequestMemory\": 8000", "\"RequestMemory\": 8000.0");
        assert_eq!(
            parse_job_json(&real).unwrap().request_memory_bytes,
            8000 << 20
        );
    }
}
