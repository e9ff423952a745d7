//! VO, group and role from a VOMS FQAN, as APEL's `parse_fqan` derives them.

/// VO, group and role of an FQAN: `/atlas/Role=production/Capability=NULL` →
/// (`atlas`, `/atlas`, `Role=production`). Only the part before a `;` is read; the group is
/// every component before `Role=` joined with `/`; the role keeps its `Role=` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoAttributes {
    pub vo: String,
    pub group: String,
    pub role: Option<String>,
}

/// Parses `fqan`; `None` when it names no VO.
pub fn parse(fqan: &str) -> Option<VoAttributes> {
    let first = fqan.split(';').next().unwrap_or_default();
    let parts: Vec<&str> = first.split('/').filter(|p| !p.is_empty()).collect();
    let vo = (*parts.first()?).to_string();
    if vo.starts_with("Role=") || vo.starts_with("Capability=") {
        return None;
    }
    let mut group = Vec::new();
    let mut role = None;
    for p in &parts {
        if p.starts_with("Role=") {
            role = Some((*p).to_string());
            break;
        }
        if p.starts_with("Capability=") {
            break;
        }
        group.push(*p);
    }
    Some(VoAttributes {
        vo,
        group: format!("/{}", group.join("/")),
        role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqans_split_as_apel_splits_them() {
        assert_eq!(
            parse("/atlas/Role=production/Capability=NULL"),
            Some(VoAttributes {
                vo: "atlas".into(),
                group: "/atlas".into(),
                role: Some("Role=production".into())
            })
        );
        assert_eq!(
            parse("/cms/uscms/Role=NULL;/cms/Role=pilot"),
            Some(VoAttributes {
                vo: "cms".into(),
                group: "/cms/uscms".into(),
                role: Some("Role=NULL".into())
            })
        );
        assert_eq!(parse("/dteam").map(|a| a.role), Some(None));
        assert_eq!(parse(""), None);
    }
}
