//! X.509 proxies and their VOMS attribute certificates, verified offline (issue 9, item 4).
//!
//! The job starter sends the certificates of the job's proxy (`X509_USER_PROXY`, else
//! `/tmp/x509up_u<uid>`; never the private key). The agent checks, with no network:
//!
//! 1. **The chain**: each certificate's signature verifies with its issuer's key (the next one in
//!    the chain, or a CA of `ca_dir`). Each proxy's subject is its issuer's subject plus one
//!    `CN` (RFC 3820 or legacy). The end-entity certificate (the first that is no proxy) was
//!    issued by a CA of `ca_dir` (an OpenSSL hashed directory such as
//!    `/etc/grid-security/certificates`: every `*.0`…`*.9` and `*.pem` file). Every certificate
//!    is valid now.
//! 2. **The VOMS attribute certificate** (extension 1.3.6.1.4.1.8005.100.100.5 of a proxy): its
//!    signature verifies with the VOMS server certificate it carries (1.3.6.1.4.1.8005.100.100.10);
//!    that certificate was issued by a CA of `ca_dir`, and the LSC file
//!    `<vomsdir>/<vo>/<voms host>.lsc` names its subject and issuer; the AC is valid now; its
//!    holder is the end-entity certificate (the serial number); and every FQAN lies under its
//!    VO.
//!
//! What it yields: the end-entity DN (OpenSSL slash form), the VO and the FQANs, primary first.
//! Debian's `voms-proxy-info` and `voms-verify` accept an AC signed by a VOMS server that no LSC
//! names (checked here), so this check is WNoDeS's own. Proxies in tests come from Debian's
//! `voms-proxy-fake`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use x509_parser::{certificate::X509Certificate, prelude::FromDer, x509::X509Name};

/// `[agent.identity]`'s X.509 settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct X509Config {
    /// Trusted CAs (default `/etc/grid-security/certificates`).
    pub ca_dir: PathBuf,
    /// VOMS LSC files, `<vomsdir>/<vo>/<host>.lsc` (default `/etc/grid-security/vomsdir`).
    pub vomsdir: PathBuf,
}

impl Default for X509Config {
    fn default() -> Self {
        Self {
            ca_dir: "/etc/grid-security/certificates".into(),
            vomsdir: "/etc/grid-security/vomsdir".into(),
        }
    }
}

/// A verified proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProxy {
    /// The end-entity certificate's subject, `/C=…/O=…/CN=…`.
    pub dn: String,
    pub vo: String,
    /// The FQANs, primary first.
    pub fqans: Vec<String>,
}

/// Why a proxy is refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the proxy holds no certificate that parses: {0}")]
    Unreadable(String),
    #[error("certificate {subject} expired at {not_after} or is not valid yet")]
    NotValidNow { subject: String, not_after: String },
    #[error("certificate {subject} is not signed by its issuer {issuer}")]
    BadSignature { subject: String, issuer: String },
    #[error("proxy {subject} is not named after its issuer {issuer} plus one CN")]
    ProxyName { subject: String, issuer: String },
    #[error("certificate {subject} was issued by {issuer}, which is no trusted CA of {ca_dir}")]
    UntrustedCa {
        subject: String,
        issuer: String,
        ca_dir: PathBuf,
    },
    #[error("the proxy carries no VOMS attribute certificate")]
    NoVoms,
    #[error("the VOMS attribute certificate does not parse: {0}")]
    AcMalformed(String),
    #[error("the VOMS server {subject} (issuer {issuer}) is not trusted for VO '{vo}': {why}")]
    UntrustedVoms {
        vo: String,
        subject: String,
        issuer: String,
        why: String,
    },
    #[error("the VOMS attribute certificate's signature does not verify with its server's key")]
    AcSignature,
    #[error("the VOMS attribute certificate is not valid now (valid {not_before} to {not_after})")]
    AcNotValidNow { not_before: i64, not_after: i64 },
    #[error("the VOMS attribute certificate belongs to another certificate (serial {0})")]
    AcHolder(String),
    #[error("the FQAN {fqan:?} is not under the attribute certificate's VO '{vo}'")]
    Fqan { fqan: String, vo: String },
}

const OID_PROXY_INFO: &str = "1.3.6.1.5.5.7.1.14";
const OID_PROXY_INFO_DRAFT: &str = "1.3.6.1.4.1.3536.1.222";
const OID_VOMS_AC_SEQ: &str = "1.3.6.1.4.1.8005.100.100.5";
const OID_VOMS_FQANS: &str = "1.3.6.1.4.1.8005.100.100.4";
const OID_VOMS_AC_CERTS: &str = "1.3.6.1.4.1.8005.100.100.10";

/// A name in OpenSSL's slash form (`/C=IT/O=…/CN=…`), as LSC files and grid DNs write it.
pub fn slash_dn(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    for rdn in name.iter_rdn() {
        for atv in rdn.iter() {
            let oid = atv.attr_type().to_id_string();
            let key = match oid.as_str() {
                "2.5.4.6" => "C",
                "2.5.4.10" => "O",
                "2.5.4.11" => "OU",
                "2.5.4.3" => "CN",
                "2.5.4.7" => "L",
                "2.5.4.8" => "ST",
                "0.9.2342.19200300.100.1.25" => "DC",
                "0.9.2342.19200300.100.1.1" => "UID",
                "1.2.840.113549.1.9.1" => "emailAddress",
                _ => oid.as_str(),
            };
            let value = atv.as_str().map_or_else(|_| "?".to_owned(), str::to_owned);
            out.push('/');
            out.push_str(key);
            out.push('=');
            out.push_str(&value);
        }
    }
    out
}

/// Certificates in PEM text (every `CERTIFICATE` block, in order), as DER.
///
/// # Errors
/// No certificate block.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, ProxyError> {
    let mut ders = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let p = p.map_err(|e| ProxyError::Unreadable(e.to_string()))?;
        if p.label == "CERTIFICATE" {
            ders.push(p.contents);
        }
    }
    if ders.is_empty() {
        return Err(ProxyError::Unreadable("no CERTIFICATE block".into()));
    }
    Ok(ders)
}

/// The CA certificates of `dir` (DER), unreadable files skipped.
fn load_cas(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let hashed = name
            .rsplit_once('.')
            .is_some_and(|(_, ext)| ext.len() == 1 && ext.bytes().all(|b| b.is_ascii_digit()));
        if !(hashed || name.ends_with(".pem")) {
            continue;
        }
        if let Ok(text) = std::fs::read(&path)
            && let Ok(ders) = pem_certificates(&text)
        {
            out.extend(ders);
        }
    }
    out
}

/// Clock skew allowed on a certificate's or an AC's start of validity (a proxy made a moment
/// ago on a host whose clock is a little ahead).
pub const NOT_BEFORE_LEEWAY_SECS: i64 = 300;

fn valid_now(c: &X509Certificate<'_>, now: i64) -> Result<(), ProxyError> {
    let v = c.validity();
    if v.not_before.timestamp() <= now + NOT_BEFORE_LEEWAY_SECS && now <= v.not_after.timestamp() {
        Ok(())
    } else {
        Err(ProxyError::NotValidNow {
            subject: slash_dn(c.subject()),
            not_after: v.not_after.to_string(),
        })
    }
}

fn is_proxy(c: &X509Certificate<'_>) -> bool {
    let ext = c.iter_extensions().any(|e| {
        let id = e.oid.to_id_string();
        id == OID_PROXY_INFO || id == OID_PROXY_INFO_DRAFT
    });
    let subject = slash_dn(c.subject());
    let issuer = slash_dn(c.issuer());
    ext || (subject.starts_with(&issuer)
        && subject[issuer.len()..].starts_with("/CN=")
        && !subject[issuer.len() + 4..].contains('/'))
}

/// The CA of `dir` that issued `c` and whose key verifies its signature.
fn trusted_issuer<'a>(
    c: &X509Certificate<'_>,
    cas: &'a [X509Certificate<'a>],
    now: i64,
) -> Option<&'a X509Certificate<'a>> {
    cas.iter().find(|ca| {
        ca.subject().as_raw() == c.issuer().as_raw()
            && c.verify_signature(Some(ca.public_key())).is_ok()
            && valid_now(ca, now).is_ok()
    })
}

/// Verifies the proxy `pem` (its certificates) at `now` (Unix seconds).
///
/// # Errors
/// The first reason the proxy is refused.
pub fn verify(pem: &[u8], cfg: &X509Config, now: i64) -> Result<VerifiedProxy, ProxyError> {
    let ders = pem_certificates(pem)?;
    let certs: Vec<X509Certificate<'_>> = ders
        .iter()
        .map(|d| {
            X509Certificate::from_der(d)
                .map(|(_, c)| c)
                .map_err(|e| ProxyError::Unreadable(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let ca_ders = load_cas(&cfg.ca_dir);
    let cas: Vec<X509Certificate<'_>> = ca_ders
        .iter()
        .filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
        .collect();
    // Walk from the leaf: proxies, then the end-entity certificate.
    let mut i = 0;
    let eec = loop {
        let c = &certs[i];
        valid_now(c, now)?;
        if !is_proxy(c) {
            break c;
        }
        let subject = slash_dn(c.subject());
        let issuer_dn = slash_dn(c.issuer());
        if !subject.starts_with(&issuer_dn) {
            return Err(ProxyError::ProxyName {
                subject,
                issuer: issuer_dn,
            });
        }
        let Some(next) = certs
            .iter()
            .position(|n| n.subject().as_raw() == c.issuer().as_raw())
        else {
            return Err(ProxyError::UntrustedCa {
                subject,
                issuer: issuer_dn,
                ca_dir: cfg.ca_dir.clone(),
            });
        };
        if c.verify_signature(Some(certs[next].public_key())).is_err() {
            return Err(ProxyError::BadSignature {
                subject,
                issuer: issuer_dn,
            });
        }
        if next == i {
            // A self-signed "proxy".
            return Err(ProxyError::UntrustedCa {
                subject,
                issuer: issuer_dn,
                ca_dir: cfg.ca_dir.clone(),
            });
        }
        i = next;
    };
    if trusted_issuer(eec, &cas, now).is_none() {
        return Err(ProxyError::UntrustedCa {
            subject: slash_dn(eec.subject()),
            issuer: slash_dn(eec.issuer()),
            ca_dir: cfg.ca_dir.clone(),
        });
    }
    let dn = slash_dn(eec.subject());
    // The VOMS AC, in the first proxy that carries one.
    let ac_seq = certs[..i]
        .iter()
        .find_map(|c| {
            c.iter_extensions()
                .find(|e| e.oid.to_id_string() == OID_VOMS_AC_SEQ)
                .map(|e| e.value)
        })
        .ok_or(ProxyError::NoVoms)?;
    let ac = parse_ac(ac_seq).map_err(ProxyError::AcMalformed)?;
    // The VOMS server's certificate: issued by a trusted CA and named by the VO's LSC.
    let (_, voms) = X509Certificate::from_der(&ac.server_cert)
        .map_err(|e| ProxyError::AcMalformed(format!("the VOMS server certificate: {e}")))?;
    let (voms_subject, voms_issuer) = (slash_dn(voms.subject()), slash_dn(voms.issuer()));
    let untrusted = |why: String| ProxyError::UntrustedVoms {
        vo: ac.vo.clone(),
        subject: voms_subject.clone(),
        issuer: voms_issuer.clone(),
        why,
    };
    if !valid_vo_name(&ac.vo) || !valid_host(&ac.host) {
        return Err(ProxyError::AcMalformed(format!(
            "policy authority {:?}",
            ac.authority
        )));
    }
    let lsc_path = cfg.vomsdir.join(&ac.vo).join(format!("{}.lsc", ac.host));
    let lsc = std::fs::read_to_string(&lsc_path)
        .map_err(|e| untrusted(format!("no LSC file {}: {e}", lsc_path.display())))?;
    if !lsc_names(&lsc, &voms_subject, &voms_issuer) {
        return Err(untrusted(format!(
            "{} names another server",
            lsc_path.display()
        )));
    }
    valid_now(&voms, now).map_err(|e| untrusted(e.to_string()))?;
    if trusted_issuer(&voms, &cas, now).is_none() {
        return Err(untrusted(format!(
            "its issuer is no trusted CA of {}",
            cfg.ca_dir.display()
        )));
    }
    // The AC's signature, with the server's key.
    let alg: &dyn ring::signature::VerificationAlgorithm = match ac.sig_alg.as_str() {
        "1.2.840.113549.1.1.11" => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        "1.2.840.113549.1.1.12" => &ring::signature::RSA_PKCS1_2048_8192_SHA384,
        "1.2.840.113549.1.1.13" => &ring::signature::RSA_PKCS1_2048_8192_SHA512,
        "1.2.840.113549.1.1.5" => &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
        other => {
            return Err(ProxyError::AcMalformed(format!(
                "signature algorithm {other}"
            )));
        }
    };
    let key = voms.public_key().subject_public_key.data.as_ref();
    ring::signature::UnparsedPublicKey::new(alg, key)
        .verify(ac.info, ac.signature)
        .map_err(|_| ProxyError::AcSignature)?;
    if !(ac.not_before <= now + NOT_BEFORE_LEEWAY_SECS && now <= ac.not_after) {
        return Err(ProxyError::AcNotValidNow {
            not_before: ac.not_before,
            not_after: ac.not_after,
        });
    }
    if ac.holder_serial.as_slice() != trim_zeros(eec.raw_serial()) {
        return Err(ProxyError::AcHolder(eec.raw_serial_as_string()));
    }
    let root = format!("/{}", ac.vo);
    if let Some(f) = ac
        .fqans
        .iter()
        .find(|f| **f != root && !f.starts_with(&format!("{root}/")))
    {
        return Err(ProxyError::Fqan {
            fqan: f.clone(),
            vo: ac.vo.clone(),
        });
    }
    Ok(VerifiedProxy {
        dn,
        vo: ac.vo,
        fqans: ac.fqans,
    })
}

fn trim_zeros(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|x| **x == 0).count();
    &b[n.min(b.len().saturating_sub(1))..]
}

fn valid_vo_name(vo: &str) -> bool {
    !vo.is_empty()
        && vo
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        && !vo.starts_with('.')
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !h.starts_with('.')
}

/// Whether an LSC file (subject, issuer; pairs separated by `------`) names this pair.
fn lsc_names(lsc: &str, subject: &str, issuer: &str) -> bool {
    let lines: Vec<&str> = lsc
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    lines
        .split(|l| l.starts_with("------"))
        .any(|pair| pair.len() >= 2 && pair[0] == subject && pair[1] == issuer)
}

/// What WNoDeS reads of a VOMS attribute certificate.
struct Ac<'a> {
    /// The DER of `acinfo`, what the signature covers.
    info: &'a [u8],
    sig_alg: String,
    signature: &'a [u8],
    holder_serial: Vec<u8>,
    not_before: i64,
    not_after: i64,
    /// `vo://host:port`.
    authority: String,
    vo: String,
    host: String,
    fqans: Vec<String>,
    server_cert: Vec<u8>,
}

/// One DER TLV: (tag, content, the whole TLV, what follows).
type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

fn tlv(i: &[u8]) -> Result<Tlv<'_>, String> {
    let (&tag, rest) = i.split_first().ok_or("truncated")?;
    let (&l0, rest) = rest.split_first().ok_or("truncated length")?;
    let (len, rest) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err("bad length".into());
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, b| (a << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err("truncated content".into());
    }
    let whole = &i[..i.len() - rest.len() + len];
    Ok((tag, &rest[..len], whole, &rest[len..]))
}

fn children(mut content: &[u8]) -> Result<Vec<Tlv<'_>>, String> {
    let mut out = Vec::new();
    while !content.is_empty() {
        let t = tlv(content)?;
        content = t.3;
        out.push(t);
    }
    Ok(out)
}

fn oid_string(c: &[u8]) -> String {
    x509_parser::der_parser::oid::Oid::new(std::borrow::Cow::Borrowed(c)).to_id_string()
}

/// `YYYYMMDDHHMMSSZ` as Unix seconds.
fn generalized_time(c: &[u8]) -> Result<i64, String> {
    let s = std::str::from_utf8(c).map_err(|e| e.to_string())?;
    let t = jiff::civil::DateTime::strptime("%Y%m%d%H%M%SZ", s)
        .map_err(|e| format!("time {s:?}: {e}"))?;
    t.to_zoned(jiff::tz::TimeZone::UTC)
        .map(|z| z.timestamp().as_second())
        .map_err(|e| e.to_string())
}

fn parse_ac(ext: &[u8]) -> Result<Ac<'_>, String> {
    // SEQUENCE OF SEQUENCE OF AttributeCertificate: the first AC.
    let (_, outer, _, _) = tlv(ext)?;
    let (_, acs, _, _) = tlv(outer)?;
    let (_, ac, _, _) = tlv(acs)?;
    let parts = children(ac)?;
    let [(_, info_c, info, _), (_, alg, _, _), (0x03, sig, _, _)] = parts.as_slice() else {
        return Err("an attribute certificate is three elements".into());
    };
    let (_, alg_oid, _, _) = tlv(alg)?;
    let signature = sig.get(1..).ok_or("empty signature")?;
    let f = children(info_c)?;
    if f.len() < 7 {
        return Err(format!("acinfo has {} elements", f.len()));
    }
    // Holder: [0] baseCertificateID { issuer GeneralNames, serial INTEGER }.
    let holder = children(f[1].1)?;
    let base = holder
        .iter()
        .find(|t| t.0 == 0xa0)
        .ok_or("holder without baseCertificateID")?;
    let base = children(base.1)?;
    let serial = base
        .iter()
        .find(|t| t.0 == 0x02)
        .ok_or("holder without serial")?;
    let holder_serial = trim_zeros(serial.1).to_vec();
    // Validity: SEQUENCE { notBefore, notAfter } GeneralizedTime.
    let validity = children(f[5].1)?;
    let [(0x18, nb, _, _), (0x18, na, _, _)] = validity.as_slice() else {
        return Err("validity is not two GeneralizedTimes".into());
    };
    let (not_before, not_after) = (generalized_time(nb)?, generalized_time(na)?);
    // Attributes: the FQANs and their policy authority.
    let mut authority = String::new();
    let mut fqans = Vec::new();
    for attr in children(f[6].1)? {
        let a = children(attr.1)?;
        let [(0x06, oid, _, _), (0x31, values, _, _)] = a.as_slice() else {
            continue;
        };
        if oid_string(oid) != OID_VOMS_FQANS {
            continue;
        }
        for v in children(values)? {
            for part in children(v.1)? {
                match part.0 {
                    // policyAuthority [0] GeneralNames: a URI [6].
                    0xa0 => {
                        for gn in children(part.1)? {
                            if gn.0 == 0x86 {
                                authority = String::from_utf8_lossy(gn.1).into_owned();
                            }
                        }
                    }
                    // values SEQUENCE OF OCTET STRING.
                    0x30 => {
                        for val in children(part.1)? {
                            if val.0 == 0x04 {
                                fqans.push(String::from_utf8_lossy(val.1).into_owned());
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let (vo, hostport) = authority
        .split_once("://")
        .ok_or_else(|| format!("policy authority {authority:?} is not vo://host:port"))?;
    let host = hostport.split(':').next().unwrap_or_default().to_owned();
    if fqans.is_empty() {
        return Err("no FQAN".into());
    }
    // Extensions (the last element when tagged [0x30] after the attributes): the server's cert.
    let mut server_cert = None;
    for ext in f[7..].iter().filter(|t| t.0 == 0x30) {
        for e in children(ext.1)? {
            let parts = children(e.1)?;
            let Some((0x06, oid, _, _)) = parts.first().copied() else {
                continue;
            };
            if oid_string(oid) != OID_VOMS_AC_CERTS {
                continue;
            }
            let Some((0x04, value, _, _)) = parts.last().copied() else {
                continue;
            };
            // VOMS writes `AC_CERTS ::= SEQUENCE { SEQUENCE OF Certificate }`; take the first
            // element that parses as a certificate, one or two levels down.
            let (_, outer, _, _) = tlv(value)?;
            let (_, inner, first, _) = tlv(outer)?;
            let (_, _, second, _) = tlv(inner)?;
            server_cert = [first, second]
                .into_iter()
                .find(|c| X509Certificate::from_der(c).is_ok())
                .map(<[u8]>::to_vec);
        }
    }
    Ok(Ac {
        info,
        sig_alg: oid_string(alg_oid),
        signature,
        holder_serial,
        not_before,
        not_after,
        vo: vo.to_owned(),
        host,
        authority,
        fqans,
        server_cert: server_cert.ok_or("no VOMS server certificate in the AC")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsc_files_name_subject_and_issuer_pairs() {
        let lsc =
            "# a comment\n/C=IT/O=T/CN=voms.example.org\n/C=IT/O=T/CN=CA\n------\n/CN=b\n/CN=CA2\n";
        assert!(lsc_names(
            lsc,
            "/C=IT/O=T/CN=voms.example.org",
            "/C=IT/O=T/CN=CA"
        ));
        assert!(lsc_names(lsc, "/CN=b", "/CN=CA2"));
        assert!(!lsc_names(lsc, "/C=IT/O=T/CN=voms.example.org", "/CN=CA2"));
    }

    #[test]
    fn der_lengths_and_times_are_read() {
        // A SEQUENCE of 200 bytes (long-form length), then a byte after it.
        let mut d = vec![0x30, 0x81, 200];
        d.extend(std::iter::repeat_n(0u8, 200));
        d.push(7);
        let (tag, content, whole, rest) = tlv(&d).unwrap();
        assert_eq!(
            (tag, content.len(), whole.len(), rest),
            (0x30, 200, 203, &[7u8][..])
        );
        assert!(tlv(&[0x30, 0x05, 1]).is_err());
        assert_eq!(generalized_time(b"20261202120000Z").unwrap(), 1_796_212_800);
        assert!(generalized_time(b"2026").is_err());
        assert_eq!(trim_zeros(&[0, 0, 5]), &[5]);
        assert_eq!(trim_zeros(&[0]), &[0]);
    }
}
