//! `netlink-links` and `vf-info <pf>`: links and a PF's VFs as rtnetlink reports them.

use anyhow::Context;
use futures::TryStreamExt;
use rtnetlink::packet_route::{
    AddressFamily,
    link::{LinkAttribute, LinkExtentMask, LinkInfo, LinkMessage, VfInfo, VfLinkState},
};
use serde_json::{Value, json};

/// Every link: `[{"index", "name", "mac", "mtu", "oper", "kind", "parent", "num_vf"}]`.
///
/// # Errors
/// When the netlink socket cannot be opened or the dump fails.
pub async fn links() -> anyhow::Result<Value> {
    let (connection, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
    let conn = tokio::spawn(connection);
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("dumping links")?;
    conn.abort();
    Ok(Value::Array(msgs.iter().map(link_json).collect()))
}

/// The VFs of `pf`, asked with `RTEXT_FILTER_VF`: `{"pf", "num_vf", "vfs": [{"vf", "mac",
/// "vlan", "qos", "spoofchk", "trust", "link_state"}]}`, sorted by VF number.
///
/// # Errors
/// When the netlink socket cannot be opened or `pf` does not exist.
pub async fn vf_info(pf: &str) -> anyhow::Result<Value> {
    let (connection, handle, _) = rtnetlink::new_connection().context("netlink socket")?;
    let conn = tokio::spawn(connection);
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .match_name(pf)
        .set_filter_mask(AddressFamily::Unspec, vec![LinkExtentMask::Vf])
        .execute()
        .try_collect()
        .await
        .with_context(|| format!("getting link {pf}"))?;
    conn.abort();
    let msg = msgs
        .first()
        .with_context(|| format!("no link named {pf}"))?;
    Ok(vfs_json(pf, msg))
}

fn mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One link as JSON (absent attributes are null).
pub fn link_json(msg: &LinkMessage) -> Value {
    let mut v = json!({
        "index": msg.header.index,
        "name": null, "mac": null, "mtu": null, "oper": null,
        "kind": null, "parent": null, "num_vf": null,
    });
    for attr in &msg.attributes {
        let (key, value) = match attr {
            LinkAttribute::IfName(n) => ("name", json!(n)),
            LinkAttribute::Address(a) => ("mac", json!(mac(a))),
            LinkAttribute::Mtu(m) => ("mtu", json!(m)),
            LinkAttribute::OperState(s) => ("oper", json!(s.to_string())),
            LinkAttribute::Link(p) => ("parent", json!(p)),
            LinkAttribute::NumVf(n) => ("num_vf", json!(n)),
            LinkAttribute::LinkInfo(infos) => {
                let Some(kind) = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                }) else {
                    continue;
                };
                ("kind", json!(kind))
            }
            _ => continue,
        };
        v[key] = value;
    }
    v
}

/// A PF's link message (asked with the VF ext filter) as its VFs.
pub fn vfs_json(pf: &str, msg: &LinkMessage) -> Value {
    let mut num_vf = Value::Null;
    let mut vfs: Vec<(u32, Value)> = Vec::new();
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::NumVf(n) => num_vf = json!(n),
            LinkAttribute::VfInfoList(list) => {
                for info in list {
                    let mut vf = json!({
                        "vf": null, "mac": null, "vlan": null, "qos": null,
                        "spoofchk": null, "trust": null, "link_state": null,
                    });
                    let mut id = None;
                    for item in &info.0 {
                        match item {
                            VfInfo::Mac(m) => {
                                id = Some(m.vf_id);
                                vf["mac"] = json!(mac(&m.mac[..6]));
                            }
                            VfInfo::Vlan(l) => {
                                id = Some(l.vf_id);
                                vf["vlan"] = json!(l.vlan_id);
                                vf["qos"] = json!(l.qos);
                            }
                            VfInfo::SpoofCheck(s) => vf["spoofchk"] = json!(s.enabled),
                            VfInfo::Trust(t) => vf["trust"] = json!(t.enabled),
                            VfInfo::LinkState(s) => {
                                vf["link_state"] = json!(match s.state {
                                    VfLinkState::Auto => "auto".to_owned(),
                                    VfLinkState::Enable => "enable".to_owned(),
                                    VfLinkState::Disable => "disable".to_owned(),
                                    other => format!("{other:?}"),
                                });
                            }
                            _ => {}
                        }
                    }
                    let id = id.unwrap_or(u32::try_from(vfs.len()).unwrap_or(u32::MAX));
                    vf["vf"] = json!(id);
                    vfs.push((id, vf));
                }
            }
            _ => {}
        }
    }
    vfs.sort_by_key(|(i, _)| *i);
    json!({
        "pf": pf,
        "num_vf": num_vf,
        "vfs": vfs.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::{
        InfoKind, LinkVfInfo, State, VfInfoLinkState, VfInfoMac, VfInfoSpoofCheck, VfInfoTrust,
        VfInfoVlan,
    };

    fn vf(id: u32, mac: [u8; 6], vlan: u32) -> LinkVfInfo {
        LinkVfInfo(vec![
            VfInfo::Mac(VfInfoMac::new(id, &mac)),
            VfInfo::Vlan(VfInfoVlan::new(id, vlan, 0)),
            VfInfo::SpoofCheck(VfInfoSpoofCheck::new(id, true)),
            VfInfo::Trust(VfInfoTrust::new(id, false)),
            VfInfo::LinkState(VfInfoLinkState::new(id, VfLinkState::Auto)),
        ])
    }

    #[test]
    fn a_pfs_vf_list_becomes_one_entry_per_vf_in_vf_order() {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::NumVf(2));
        msg.attributes.push(LinkAttribute::VfInfoList(vec![
            vf(1, [0x52, 0x54, 0, 0xaa, 0xbb, 2], 0),
            vf(0, [0x52, 0x54, 0, 0xaa, 0xbb, 1], 100),
        ]));
        let v = vfs_json("eth0", &msg);
        assert_eq!(v["num_vf"], 2);
        assert_eq!(v["vfs"][0]["vf"], 0);
        assert_eq!(v["vfs"][0]["mac"], "52:54:00:aa:bb:01");
        assert_eq!(v["vfs"][0]["vlan"], 100);
        assert_eq!(v["vfs"][0]["spoofchk"], true);
        assert_eq!(v["vfs"][0]["trust"], false);
        assert_eq!(v["vfs"][0]["link_state"], "auto");
        assert_eq!(v["vfs"][1]["vf"], 1);
        assert_eq!(v["vfs"][1]["vlan"], 0);
    }

    #[test]
    fn a_link_without_vfs_has_an_empty_list() {
        let v = vfs_json("lo", &LinkMessage::default());
        assert_eq!(v, json!({"pf": "lo", "num_vf": null, "vfs": []}));
    }

    #[test]
    fn a_vlan_link_shows_its_kind_and_parent() {
        let mut msg = LinkMessage::default();
        msg.header.index = 5;
        msg.attributes.extend([
            LinkAttribute::IfName("eth0.100".into()),
            LinkAttribute::Address(vec![0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            LinkAttribute::Mtu(1500),
            LinkAttribute::OperState(State::Down),
            LinkAttribute::Link(2),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Vlan)]),
        ]);
        let v = link_json(&msg);
        assert_eq!(v["index"], 5);
        assert_eq!(v["name"], "eth0.100");
        assert_eq!(v["mac"], "52:54:00:12:34:56");
        assert_eq!(v["mtu"], 1500);
        assert_eq!(v["kind"], "vlan");
        assert_eq!(v["parent"], 2);
        assert_eq!(v["num_vf"], Value::Null);
    }
}
