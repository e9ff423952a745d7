//! The network service against real taps, bridges and nftables, each test inside its own network
//! namespaces (nothing touches the host's network), with a real nats-server and consumer.
//! Host tests (`wnodes_testkit::host`): all but the user-mode one need root and `nft`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::process::{Command, ExitCode};

use serde_json::Value;
use wnodes_bus::{EventType, proto, proto::event::Body};
use wnodes_network::{
    NetworkHandler,
    config::{Ipv4Net, Mode},
    host::Host,
    service,
    sriov::SriovConfig,
    tap_vlan::Vlans,
    vlan::{Method, MethodSetting, VlanConfig, VlanNetworkConfig},
};
use wnodes_testkit::{host, host_test, service::*};

/// A "hypervisor" namespace with bridge `wnbr0` at 10.231.1.1/24.
fn hypervisor() -> Netns {
    let ns = Netns::new("hv");
    ns.ip(&["link", "add", "wnbr0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.231.1.1/24", "dev", "wnbr0"]);
    ns.ip(&["link", "set", "wnbr0", "up"]);
    ns
}

fn handler(ns: &Netns, bridge: &str, pool: &str) -> NetworkHandler {
    NetworkHandler {
        host: Host::new(Some(ns.0.clone())).unwrap(),
        mode: Mode::Tap,
        bridge: bridge.into(),
        pool: Some(pool.parse::<Ipv4Net>().unwrap()),
        sriov: SriovConfig::default(),
        sriov_network: None,
        vlans: Vlans::default(),
        source: "network@hv1.test".into(),
    }
}

/// VOs on VLANs: atlas on 100, cms on 200, each VLAN's network here (no trunk: the host has no
/// 8021q).
fn vlan_config(method: MethodSetting) -> VlanConfig {
    VlanConfig {
        vo_vlans: [("atlas".to_owned(), 100), ("cms".to_owned(), 200)].into(),
        method,
        networks: [("100", "10.231.100.1/24"), ("200", "10.231.200.1/24")]
            .into_iter()
            .map(|(k, a)| {
                (
                    k.to_owned(),
                    VlanNetworkConfig {
                        address: a.into(),
                        pool: None,
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

fn vo_spec(vm_id: &str, vo: &str) -> proto::VmSpec {
    proto::VmSpec {
        vm_id: vm_id.into(),
        vo: vo.into(),
        ..Default::default()
    }
}

/// The IPv4 addresses of `name`, as `a.b.c.d/n`.
fn addresses(ns: &Netns, name: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", &ns.0, "-j", "-4", "addr", "show", "dev", name])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .and_then(|a| a.first())
        .and_then(|l| l["addr_info"].as_array())
        .map(|a| {
            a.iter()
                .map(|i| format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

async fn start(tb: &TestBus, h: NetworkHandler) {
    let store = tb.store("network.db").await;
    service::init_store(&store).await.unwrap();
    h.reconcile(&store).await.unwrap();
    tb.consume(store, &wnodes_bus::roles::NETWORK, HOST, h)
        .await;
}

fn link(ns: &Netns, name: &str) -> Option<Value> {
    let out = Command::new("ip")
        .args(["-n", &ns.0, "-d", "-j", "link", "show", "dev", name])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().and_then(|a| a.first()).cloned()
}

fn ruleset(ns: &Netns) -> Value {
    serde_json::from_str(&ns.exec(&["nft", "-j", "list", "ruleset"])).unwrap()
}

/// The rules of chain `chain` in table bridge wnodes, as JSON text (one per rule).
fn chain_rules(ns: &Netns, chain: &str) -> Vec<String> {
    ruleset(ns)["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
        .filter(|r| r["family"] == "bridge" && r["table"] == "wnodes" && r["chain"] == chain)
        .map(|r| r["expr"].to_string())
        .collect()
}

fn has_chain(ns: &Netns, chain: &str) -> bool {
    ruleset(ns)["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("chain"))
        .any(|c| c["table"] == "wnodes" && c["name"] == chain)
}

async fn tap_with_filter_then_release_and_tombstone() {
    let ns = hypervisor();
    let tb = TestBus::start().await;
    start(&tb, handler(&ns, "wnbr0", "10.231.1.0/24")).await;

    let vm = "vm-0123456789ab";
    tb.publish(&ev(&run("1"), vm_requested(vm_spec(vm)))).await;
    let r = tb.wait_payload::<proto::NetworkReady>(vm).await;
    assert_eq!(r.mode, proto::NetworkMode::VirtioTap as i32);
    assert_eq!(r.tap, "wn-0123456789ab");
    assert_eq!(r.address, "10.231.1.2/24", "the bridge's .1 is skipped");
    assert_eq!(r.gateway, "10.231.1.1");
    assert_eq!(r.bridge, "wnbr0");
    assert!(r.address_filtered);
    assert!(r.mac.starts_with("52:54:00:"), "{}", r.mac);

    // The tap exists, is a tap, and sits in the bridge.
    let l = link(&ns, &r.tap).expect("tap exists");
    assert_eq!(l["linkinfo"]["info_kind"], "tun");
    assert_eq!(l["master"], "wnbr0");
    // The filter: the map sends the tap to its chain, the chain pins MAC and IPv4.
    let rules = chain_rules(&ns, &r.tap);
    assert!(
        rules
            .iter()
            .any(|x| x.contains(&r.mac) && x.contains("saddr")),
        "{rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|x| x.contains("\"ip\"") && x.contains("10.231.1.2")),
        "{rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|x| x.contains("\"arp\"") && x.contains("10.231.1.2")),
        "{rules:?}"
    );
    let base = chain_rules(&ns, "prerouting");
    assert!(base.iter().any(|x| x.contains("@taps")), "{base:?}");
    let rs = ruleset(&ns).to_string();
    assert!(
        rs.contains("\"jump\":{\"target\":\"wn-0123456789ab\"}"),
        "{rs}"
    );

    // Idempotent by vm_id: the same VM requested again (another event) gets the same lease,
    // and still one tap.
    tb.publish(&ev(&run("1").attempt(2), vm_requested(vm_spec(vm))))
        .await;
    tb.wait_for("second network.ready", |e| {
        (e.run.as_ref()?.run_attempt == 2 && matches!(e.body, Some(Body::NetworkReady(_))))
            .then_some(())
    })
    .await;
    let readies = tb.events_of(vm).payloads::<proto::NetworkReady>();
    assert_eq!(readies.len(), 2);
    assert_eq!(readies[0], readies[1]);
    let taps = Host::new(Some(ns.0.clone()))
        .unwrap()
        .list_taps()
        .await
        .unwrap();
    assert_eq!(taps, vec![r.tap.clone()]);

    // A second VM gets the next address and another MAC.
    let vm2 = "vm-aaaaaaaaaaaa";
    tb.publish(&ev(&run("2"), vm_requested(vm_spec(vm2)))).await;
    let r2 = tb.wait_payload::<proto::NetworkReady>(vm2).await;
    assert_eq!(r2.address, "10.231.1.3/24");
    assert_ne!(r2.mac, r.mac);

    // Release: tap, chain and map element gone, address free again.
    tb.publish(&ev(&run("1"), vm_stopped(vm))).await;
    let detail = tb.wait_released(vm, proto::ResourceKind::Network).await;
    assert!(
        detail.contains("tap wn-0123456789ab") && detail.contains("10.231.1.2"),
        "{detail}"
    );
    assert!(link(&ns, "wn-0123456789ab").is_none());
    assert!(!has_chain(&ns, "wn-0123456789ab"));
    assert!(!ruleset(&ns).to_string().contains("\"wn-0123456789ab\""));
    assert!(link(&ns, &r2.tap).is_some(), "the other VM keeps its tap");

    // Tombstone: a vm.requested after the release is released, not prepared.
    tb.publish(&ev(&run("1").attempt(3), vm_requested(vm_spec(vm))))
        .await;
    tb.wait_for("late request answered", |e| {
        (e.run.as_ref()?.run_attempt == 3 && matches!(e.body, Some(Body::ResourceReleased(_))))
            .then_some(())
    })
    .await;
    assert!(
        !tb.seen
            .lock()
            .iter()
            .any(|e| e.run.as_ref().unwrap().run_attempt == 3
                && matches!(e.body, Some(Body::NetworkReady(_)))),
        "no network.ready after the release"
    );
    assert!(link(&ns, "wn-0123456789ab").is_none());

    // The freed address goes to the next VM.
    let vm3 = "vm-bbbbbbbbbbbb";
    tb.publish(&ev(&run("3"), vm_requested(vm_spec(vm3)))).await;
    assert_eq!(
        tb.wait_payload::<proto::NetworkReady>(vm3).await.address,
        "10.231.1.2/24"
    );

    // vm.failed releases too; releasing a VM never prepared leaves a tombstone.
    tb.publish(&ev(&run("2"), vm_failed(vm2, "launch", "test")))
        .await;
    tb.wait_released(vm2, proto::ResourceKind::Network).await;
    assert!(link(&ns, &r2.tap).is_none());
    let vm4 = "vm-cccccccccccc";
    tb.publish(&ev(&run("4"), vm_failed(vm4, "launch", "test")))
        .await;
    assert_eq!(
        tb.wait_released(vm4, proto::ResourceKind::Network).await,
        "nothing was prepared"
    );
    tb.publish(&ev(&run("4"), vm_requested(vm_spec(vm4)))).await;
    tb.wait_for("vm4's late request answered", |e| {
        let rel = e.run.as_ref()?.job_id == "4" && e.id.starts_with("resource.released");
        rel.then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !tb.events_of(vm4).has(EventType::NetworkReady),
        "no network.ready after the release"
    );
    assert!(link(&ns, "wn-cccccccccccc").is_none());
}

async fn pool_exhaustion_and_missing_bridge_fail_with_reasons() {
    let ns = hypervisor();
    let tb = TestBus::start().await;
    // /30: hosts .1 and .2; .1 is the bridge's, so exactly one VM fits.
    start(&tb, handler(&ns, "wnbr0", "10.231.1.0/30")).await;
    tb.publish(&ev(&run("1"), vm_requested(vm_spec("vm-111111111111"))))
        .await;
    assert_eq!(
        tb.wait_payload::<proto::NetworkReady>("vm-111111111111")
            .await
            .address,
        "10.231.1.2/24"
    );
    tb.publish(&ev(&run("2"), vm_requested(vm_spec("vm-222222222222"))))
        .await;
    let reason = tb
        .wait_payload::<proto::NetworkFailed>("vm-222222222222")
        .await
        .reason;
    assert!(
        reason.contains("exhausted") && reason.contains("10.231.1.0/30"),
        "{reason}"
    );
    assert!(link(&ns, "wn-222222222222").is_none());
    // Releasing the first frees the address for a third.
    tb.publish(&ev(&run("1"), vm_stopped("vm-111111111111")))
        .await;
    tb.wait_released("vm-111111111111", proto::ResourceKind::Network)
        .await;
    tb.publish(&ev(&run("3"), vm_requested(vm_spec("vm-333333333333"))))
        .await;
    assert_eq!(
        tb.wait_payload::<proto::NetworkReady>("vm-333333333333")
            .await
            .address,
        "10.231.1.2/24"
    );

    // A missing bridge (another service instance, its own store and consumer).
    let tb2 = TestBus::start().await;
    start(&tb2, handler(&ns, "wnbr9", "10.231.1.0/24")).await;
    tb2.publish(&ev(&run("9"), vm_requested(vm_spec("vm-999999999999"))))
        .await;
    let reason = tb2
        .wait_payload::<proto::NetworkFailed>("vm-999999999999")
        .await
        .reason;
    assert!(
        reason.contains("wnbr9") && reason.contains("does not exist"),
        "{reason}"
    );

    // A VM id that cannot name a tap.
    tb.publish(&ev(&run("5"), vm_requested(vm_spec("vm-job-5"))))
        .await;
    let reason = tb
        .wait_payload::<proto::NetworkFailed>("vm-job-5")
        .await
        .reason;
    assert!(reason.contains("vm-<12 hex digits>"), "{reason}");
}

async fn reconcile_removes_unknown_taps_and_chains() {
    let ns = hypervisor();
    let store_dir = tempfile::tempdir().unwrap();
    let store = wnodes_bus::KeyStore::open(&store_dir.path().join("n.db"))
        .await
        .unwrap();
    service::init_store(&store).await.unwrap();
    let h = handler(&ns, "wnbr0", "10.231.1.0/24");
    // Strays: a tap and a filter nobody holds, plus a non-tap link that must be left alone.
    ns.exec(&[
        "ip",
        "tuntap",
        "add",
        "mode",
        "tap",
        "name",
        "wn-ffffffffffff",
    ]);
    h.host
        .nft_apply(&wnodes_network::nft::vm_script(
            "wn-eeeeeeeeeeee",
            wnodes_network::mac::Mac::for_vm("x", 0),
            "10.231.1.9".parse().unwrap(),
        ))
        .await
        .unwrap();
    let removed = h.reconcile(&store).await.unwrap();
    assert!(
        removed.contains(&"tap wn-ffffffffffff".to_owned()),
        "{removed:?}"
    );
    assert!(
        removed.contains(&"nft chain wn-eeeeeeeeeeee".to_owned()),
        "{removed:?}"
    );
    assert!(link(&ns, "wn-ffffffffffff").is_none());
    assert!(!has_chain(&ns, "wn-eeeeeeeeeeee"));
    assert!(
        link(&ns, "wnbr0").is_some(),
        "the bridge (also wn*) is not a tap"
    );
    assert!(has_chain(&ns, "prerouting"));
    // Idempotent.
    assert!(h.reconcile(&store).await.unwrap().is_empty());
}

/// `ip netns exec <ns> python3 ...`: a TCP connect to `addr:port` (2 s timeout). Returns
/// `"refused"` (the SYN reached the host and the RST came back: traffic flows) or `"timeout"`.
fn probe(ns: &Netns, addr: &str) -> String {
    const SCRIPT: &str = "import socket,sys\n\
        try:\n    socket.create_connection((sys.argv[1], 9), timeout=2)\n    print('connected')\n\
        except ConnectionRefusedError:\n    print('refused')\n\
        except OSError as e:\n    print('timeout' if isinstance(e, TimeoutError) else 'error:' + str(e))\n";
    ns.exec(&["python3", "-c", SCRIPT, addr]).trim().to_owned()
}

/// Replaces tap `tap` (traffic on a tap needs qemu) by a veth whose bridge end has the tap's
/// name, its other end `eth0` in a new "VM" namespace with `mac` and `addr`.
fn veth_vm(hv: &Netns, tap: &str, mac: &str, addr: &str) -> Netns {
    let vm = Netns::new("vm");
    if link(hv, tap).is_some() {
        hv.ip(&["link", "del", tap]);
    }
    hv.ip(&[
        "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", &vm.0,
    ]);
    hv.ip(&["link", "set", tap, "master", "wnbr0", "up"]);
    vm.ip(&["link", "set", "eth0", "address", mac]);
    vm.ip(&["addr", "add", addr, "dev", "eth0"]);
    vm.ip(&["link", "set", "eth0", "up"]);
    vm
}

async fn a_vm_cannot_send_with_another_vms_addresses() {
    let hv = hypervisor();
    let tb = TestBus::start().await;
    start(&tb, handler(&hv, "wnbr0", "10.231.1.0/24")).await;
    tb.publish(&ev(&run("1"), vm_requested(vm_spec("vm-a00000000000"))))
        .await;
    tb.publish(&ev(&run("2"), vm_requested(vm_spec("vm-b00000000000"))))
        .await;
    let a = tb
        .wait_payload::<proto::NetworkReady>("vm-a00000000000")
        .await;
    let b = tb
        .wait_payload::<proto::NetworkReady>("vm-b00000000000")
        .await;

    // VM B claims A's IPv4 address (with its own MAC; A is not on the wire yet, so without the
    // filter the gateway would answer B): dropped.
    let vm_b = veth_vm(&hv, &b.tap, &b.mac, &a.address);
    assert_eq!(
        probe(&vm_b, "10.231.1.1"),
        "timeout",
        "IP spoofing got through"
    );
    // VM B with its own address but A's MAC: dropped.
    vm_b.ip(&["addr", "flush", "dev", "eth0"]);
    vm_b.ip(&["addr", "add", &b.address, "dev", "eth0"]);
    vm_b.ip(&["link", "set", "eth0", "address", &a.mac]);
    assert_eq!(
        probe(&vm_b, "10.231.1.1"),
        "timeout",
        "MAC spoofing got through"
    );
    // VM B as leased: reaches the gateway. Both neighbour tables are flushed: an ARP entry left
    // FAILED by a dropped probe answers "No route to host" until it expires.
    vm_b.ip(&["link", "set", "eth0", "address", &b.mac]);
    hv.ip(&["neigh", "flush", "all"]);
    vm_b.ip(&["neigh", "flush", "all"]);
    assert_eq!(
        probe(&vm_b, "10.231.1.1"),
        "refused",
        "the legitimate VM B is filtered"
    );

    // VM A as leased: reaches the gateway too.
    let vm_a = veth_vm(&hv, &a.tap, &a.mac, &a.address);
    assert_eq!(
        probe(&vm_a, "10.231.1.1"),
        "refused",
        "the legitimate VM A is filtered"
    );

    // A wn* port that has no filter (no lease) passes nothing.
    let vm_c = veth_vm(
        &hv,
        "wn-c00000000000",
        "52:54:00:00:00:99",
        "10.231.1.99/24",
    );
    assert_eq!(
        probe(&vm_c, "10.231.1.1"),
        "timeout",
        "an unfiltered wn* port got through"
    );

    // Control: the filter is what stops it. B on an address nobody leased: dropped; with the
    // table gone the same probe gets through.
    vm_b.ip(&["addr", "flush", "dev", "eth0"]);
    vm_b.ip(&["addr", "add", "10.231.1.77/24", "dev", "eth0"]);
    assert_eq!(probe(&vm_b, "10.231.1.1"), "timeout");
    hv.exec(&["nft", "delete", "table", "bridge", "wnodes"]);
    vm_b.ip(&["neigh", "flush", "all"]);
    assert_eq!(
        probe(&vm_b, "10.231.1.1"),
        "refused",
        "the probe cannot see the filter"
    );
}

async fn user_mode_needs_nothing_on_the_host_and_says_so() {
    // No root needed: nothing is made on the host.
    let tb = TestBus::start().await;
    let h = NetworkHandler {
        host: Host::new(None).unwrap(),
        mode: Mode::User,
        bridge: "wnbr0".into(),
        pool: None,
        sriov: SriovConfig::default(),
        sriov_network: None,
        vlans: Vlans::default(),
        source: "network@hv1.test".into(),
    };
    start(&tb, h).await;
    let vm = "vm-0a0a0a0a0a0a";
    tb.publish(&ev(&run("1"), vm_requested(vm_spec(vm)))).await;
    let r = tb.wait_payload::<proto::NetworkReady>(vm).await;
    assert_eq!(r.mode, proto::NetworkMode::User as i32);
    assert_eq!(
        (r.address.as_str(), r.gateway.as_str()),
        ("10.0.2.15/24", "10.0.2.2")
    );
    assert!(!r.address_filtered);
    assert!(r.tap.is_empty());
    // The network service owns the MAC in user mode too (the launcher no longer derives one).
    assert_eq!(r.mac, wnodes_network::mac::Mac::for_vm(vm, 0).to_string());
    assert!(
        r.note.contains("per-VM address filtering does not apply"),
        "{}",
        r.note
    );
    tb.publish(&ev(&run("1"), vm_stopped(vm))).await;
    assert!(
        tb.wait_released(vm, proto::ResourceKind::Network)
            .await
            .contains("user-mode")
    );
}

async fn the_specs_network_mode_is_honoured() {
    let ns = hypervisor();
    let tb = TestBus::start().await;
    start(&tb, handler(&ns, "wnbr0", "10.231.1.0/24")).await;
    let user = proto::VmSpec {
        vm_id: "vm-0b0b0b0b0b0b".into(),
        network_mode: proto::NetworkMode::User as i32,
        ..Default::default()
    };
    tb.publish(&ev(&run("1"), vm_requested(user))).await;
    let r = tb
        .wait_payload::<proto::NetworkReady>("vm-0b0b0b0b0b0b")
        .await;
    assert_eq!(r.mode, proto::NetworkMode::User as i32);
    assert!(
        link(&ns, "wn-0b0b0b0b0b0b").is_none(),
        "no tap for a user-mode VM"
    );
    let sriov = proto::VmSpec {
        vm_id: "vm-0c0c0c0c0c0c".into(),
        network_mode: proto::NetworkMode::Sriov as i32,
        ..Default::default()
    };
    tb.publish(&ev(&run("2"), vm_requested(sriov))).await;
    let reason = tb
        .wait_payload::<proto::NetworkFailed>("vm-0c0c0c0c0c0c")
        .await
        .reason;
    assert!(reason.contains("SR-IOV"), "{reason}");
    let tap = proto::VmSpec {
        vm_id: "vm-0d0d0d0d0d0d".into(),
        network_mode: proto::NetworkMode::VirtioTap as i32,
        ..Default::default()
    };
    tb.publish(&ev(&run("3"), vm_requested(tap))).await;
    assert_eq!(
        tb.wait_payload::<proto::NetworkReady>("vm-0d0d0d0d0d0d")
            .await
            .mode,
        proto::NetworkMode::VirtioTap as i32
    );
}

/// A sysfs tree in which `pf` is an SR-IOV physical function with the VFs `pcis` enabled.
fn fake_sysfs(dir: &std::path::Path, pf: &str, pcis: &[&str]) {
    let dev = dir.join("bus/pci/devices/0000:00:03.0");
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::create_dir_all(dir.join("class/net").join(pf)).unwrap();
    std::os::unix::fs::symlink(&dev, dir.join("class/net").join(pf).join("device")).unwrap();
    std::fs::write(dev.join("sriov_totalvfs"), "7\n").unwrap();
    std::fs::write(dev.join("sriov_numvfs"), format!("{}\n", pcis.len())).unwrap();
    for (i, pci) in pcis.iter().enumerate() {
        std::os::unix::fs::symlink(format!("../{pci}"), dev.join(format!("virtfn{i}"))).unwrap();
    }
}

/// SR-IOV on a host whose "PF" is a veth (the kernel has no VF to set): the VF picked from
/// sysfs cannot be set, the VM fails with the kernel's reason, and nothing stays held (the next
/// VM is offered the same VF). Without `[network.sriov]` the request fails naming the key. A
/// real PF is exercised inside a guest with qemu's igb (docs/sriov-and-vlans.md).
async fn sriov_without_a_settable_vf_fails_with_the_kernels_reason_and_holds_nothing() {
    let ns = hypervisor();
    ns.ip(&[
        "link", "add", "wnpf0", "type", "veth", "peer", "name", "wnpf0p",
    ]);
    let sys = tempfile::tempdir().unwrap();
    fake_sysfs(sys.path(), "wnpf0", &["0000:00:12.0", "0000:00:12.2"]);
    let mut h = handler(&ns, "wnbr0", "10.231.1.0/24");
    h.sriov = SriovConfig {
        physical_functions: vec!["wnpf0".into()],
        sysfs: sys.path().to_owned(),
        pool: Some("10.231.2.0/24".into()),
        gateway: Some("10.231.2.1".into()),
        ..Default::default()
    };
    h.vlans = Vlans::new(VlanConfig {
        vo_vlans: [("atlas".to_owned(), 100)].into(),
        ..Default::default()
    })
    .unwrap();
    h.sriov_network = Some((
        "10.231.2.0/24".parse().unwrap(),
        "10.231.2.1".parse().unwrap(),
    ));
    let tb = TestBus::start().await;
    start(&tb, h).await;
    for (i, vm) in ["vm-0e0e0e0e0e01", "vm-0e0e0e0e0e02"].iter().enumerate() {
        let spec = proto::VmSpec {
            vm_id: (*vm).into(),
            network_mode: proto::NetworkMode::Sriov as i32,
            vo: "atlas".into(),
            ..Default::default()
        };
        tb.publish(&ev(&run(&format!("sriov-{i}")), vm_requested(spec)))
            .await;
        let reason = tb.wait_payload::<proto::NetworkFailed>(vm).await.reason;
        assert!(
            reason.contains("cannot set VF 0 of wnpf0") && reason.contains("netlink"),
            "{reason}"
        );
    }
    let tb2 = TestBus::start().await;
    start(&tb2, handler(&ns, "wnbr0", "10.231.1.0/24")).await;
    let spec = proto::VmSpec {
        vm_id: "vm-0e0e0e0e0e03".into(),
        network_mode: proto::NetworkMode::Sriov as i32,
        ..Default::default()
    };
    tb2.publish(&ev(&run("sriov-off"), vm_requested(spec)))
        .await;
    let reason = tb2
        .wait_payload::<proto::NetworkFailed>("vm-0e0e0e0e0e03")
        .await
        .reason;
    assert!(
        reason.contains("[network.sriov] physical_functions is empty"),
        "{reason}"
    );
}

/// Tap VMs of a VO on its VLAN, on a host whose bridge cannot filter VLANs (this kernel:
/// `auto` finds that out and takes a bridge per VLAN): VLAN 100's bridge `wnvl100` is made
/// with the host's address on VLAN 100 when its first VM comes and removed after its last;
/// each VM gets an address of its VLAN's network and that address as its gateway, its tap in
/// the VLAN's bridge behind its filter; a VM of no VLAN stays on `wnbr0`. A restarted
/// service's reconcile removes a VLAN bridge no lease is on and keeps the held one.
async fn tap_vms_of_a_vo_get_its_vlans_bridge_made_on_the_first_and_removed_after_the_last() {
    let ns = hypervisor();
    let tb = TestBus::start().await;
    let mut h = handler(&ns, "wnbr0", "10.231.1.0/24");
    h.vlans = Vlans::new(vlan_config(MethodSetting::Auto)).unwrap();
    start(&tb, h.clone()).await;

    let (a1, a2, c1, f1) = (
        "vm-a1a1a1a1a1a1",
        "vm-a2a2a2a2a2a2",
        "vm-c1c1c1c1c1c1",
        "vm-f1f1f1f1f1f1",
    );
    for (i, (vm, vo)) in [(a1, "atlas"), (a2, "atlas"), (c1, "cms"), (f1, "lhcb")]
        .iter()
        .enumerate()
    {
        tb.publish(&ev(&run(&format!("v{i}")), vm_requested(vo_spec(vm, vo))))
            .await;
    }
    let r1 = tb.wait_payload::<proto::NetworkReady>(a1).await;
    let r2 = tb.wait_payload::<proto::NetworkReady>(a2).await;
    let rc = tb.wait_payload::<proto::NetworkReady>(c1).await;
    let rf = tb.wait_payload::<proto::NetworkReady>(f1).await;
    assert_eq!((r1.vlan, r1.bridge.as_str()), (100, "wnvl100"));
    assert_eq!(r1.gateway, "10.231.100.1");
    assert_eq!(r1.address, "10.231.100.2/24", "the host's .1 is skipped");
    assert_eq!(r2.address, "10.231.100.3/24");
    assert_eq!(
        (rc.vlan, rc.bridge.as_str(), rc.gateway.as_str()),
        (200, "wnvl200", "10.231.200.1")
    );
    assert_eq!(rc.address, "10.231.200.2/24");
    assert_eq!(
        (rf.vlan, rf.bridge.as_str(), rf.gateway.as_str()),
        (0, "wnbr0", "10.231.1.1")
    );
    assert!(r1.address_filtered && rc.address_filtered);
    // On the host: each VLAN's bridge, with the host's address on it; each tap in its bridge,
    // behind its filter; the main bridge does not filter (the kernel could not).
    for (bridge, addr) in [
        ("wnvl100", "10.231.100.1/24"),
        ("wnvl200", "10.231.200.1/24"),
    ] {
        let l = link(&ns, bridge).unwrap_or_else(|| panic!("{bridge} exists"));
        assert_eq!(l["linkinfo"]["info_kind"], "bridge");
        assert!(
            l["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
            "{l}"
        );
        assert_eq!(addresses(&ns, bridge), vec![addr.to_owned()]);
    }
    for r in [&r1, &r2, &rc, &rf] {
        let l = link(&ns, &r.tap).unwrap();
        assert_eq!(l["master"], r.bridge.as_str(), "{l}");
        let ip = r.address.split('/').next().unwrap();
        assert!(
            chain_rules(&ns, &r.tap).iter().any(|x| x.contains(ip)),
            "{} filtered",
            r.tap
        );
    }
    assert_eq!(
        h.vlans.method(),
        Some(Method::Bridges),
        "auto: this kernel's bridges cannot filter VLANs"
    );
    // Layer 3 on the host: "VMs" (namespaces whose veth the service put on VLAN 100 and 200
    // with the tap path's own code) reach the host's address on their own VLAN, not its
    // address on the other VLAN, and nothing is routed between the VLANs, even with IPv4
    // forwarding on.
    ns.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    // A TCP connect to port 9: refused means the packet arrived (the kernel's RST came back).
    let reaches = |from: &Netns, to: &str| match probe(from, to).as_str() {
        "refused" => true,
        "timeout" => false,
        other => panic!("{to}: {other}"),
    };
    let mut vms = Vec::new();
    for (vid, addr, gw) in [
        (100, "10.231.100.50/24", "10.231.100.1"),
        (200, "10.231.200.50/24", "10.231.200.1"),
    ] {
        let vm = Netns::new(&format!("v{vid}"));
        let port = format!("wnt-v{vid}");
        ns.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &vm.0,
        ]);
        let network = h.tap_network(vid).await.unwrap();
        assert_eq!(
            h.join_vlan(&port, network).await.unwrap(),
            format!("wnvl{vid}")
        );
        vm.ip(&["addr", "add", addr, "dev", "eth0"]);
        vm.ip(&["link", "set", "eth0", "up"]);
        vm.ip(&["route", "add", "default", "via", gw]);
        vms.push(vm);
    }
    let (v100, v200) = (&vms[0], &vms[1]);
    assert!(reaches(v100, "10.231.100.1"), "the host on its own VLAN");
    assert!(reaches(v200, "10.231.200.1"), "the host on its own VLAN");
    assert!(
        !reaches(v200, "10.231.100.1"),
        "the host's address on another VLAN"
    );
    assert!(
        !reaches(v100, "10.231.200.1"),
        "the host's address on another VLAN"
    );
    assert!(!reaches(v200, "10.231.100.50"), "routed to another VLAN");
    drop(vms);

    // The first atlas VM goes: its VLAN's bridge stays for the second.
    tb.publish(&ev(&run("v0"), vm_stopped(a1))).await;
    let d = tb.wait_released(a1, proto::ResourceKind::Network).await;
    assert!(!d.contains("bridge wnvl100"), "{d}");
    assert!(link(&ns, "wnvl100").is_some());
    assert!(link(&ns, &r1.tap).is_none());
    // The last goes: the bridge goes with it; VLAN 200's stays.
    tb.publish(&ev(&run("v1"), vm_failed(a2, "launch", "test")))
        .await;
    let d = tb.wait_released(a2, proto::ResourceKind::Network).await;
    assert!(d.contains("bridge wnvl100"), "{d}");
    assert!(link(&ns, "wnvl100").is_none());
    assert!(link(&ns, "wnvl200").is_some());

    // A stray VLAN bridge (say the service was killed after making it): a restarted service
    // removes it and keeps the one cms's VM is on.
    ns.ip(&["link", "add", "wnvl300", "type", "bridge"]);
    let store = tb.store("network.db").await;
    let removed = h.reconcile(&store).await.unwrap();
    assert_eq!(
        removed,
        vec!["VLAN 300's host side".to_owned()],
        "{removed:?}"
    );
    assert!(link(&ns, "wnvl300").is_none());
    assert!(link(&ns, "wnvl200").is_some());
    assert!(h.reconcile(&store).await.unwrap().is_empty());
}

/// `method = "filtering"` on a kernel whose bridges cannot filter VLANs: the VM fails with the
/// kernel's reason, and nothing is held (no tap, no lease: the next VM gets the same address).
async fn vlan_filtering_where_the_kernel_has_none_fails_with_its_reason_and_holds_nothing() {
    let ns = hypervisor();
    let tb = TestBus::start().await;
    let mut h = handler(&ns, "wnbr0", "10.231.1.0/24");
    h.vlans = Vlans::new(vlan_config(MethodSetting::Filtering)).unwrap();
    start(&tb, h).await;
    for (i, vm) in ["vm-f0f0f0f0f001", "vm-f0f0f0f0f002"].iter().enumerate() {
        tb.publish(&ev(
            &run(&format!("f{i}")),
            vm_requested(vo_spec(vm, "atlas")),
        ))
        .await;
        let reason = tb.wait_payload::<proto::NetworkFailed>(vm).await.reason;
        assert!(
            reason.contains("cannot set up VLAN 100 on this host")
                && reason.contains("Operation not supported"),
            "{reason}"
        );
        assert!(link(&ns, &format!("wn-{}", &vm[3..])).is_none());
    }
    // The untagged VM still gets the first address of the bridge's pool.
    tb.publish(&ev(
        &run("f9"),
        vm_requested(vo_spec("vm-f0f0f0f0f009", "lhcb")),
    ))
    .await;
    assert_eq!(
        tb.wait_payload::<proto::NetworkReady>("vm-f0f0f0f0f009")
            .await
            .address,
        "10.231.1.2/24"
    );
}

fn main() -> ExitCode {
    host::main(vec![
        host_test!(multi_thread tap_with_filter_then_release_and_tombstone needs [Root, Nft]),
        host_test!(multi_thread pool_exhaustion_and_missing_bridge_fail_with_reasons needs [Root, Nft]),
        host_test!(multi_thread reconcile_removes_unknown_taps_and_chains needs [Root, Nft]),
        host_test!(
            multi_thread a_vm_cannot_send_with_another_vms_addresses
            needs [Root, Nft, Python3]
        ),
        host_test!(multi_thread user_mode_needs_nothing_on_the_host_and_says_so needs []),
        host_test!(multi_thread the_specs_network_mode_is_honoured needs [Root, Nft]),
        host_test!(
            multi_thread sriov_without_a_settable_vf_fails_with_the_kernels_reason_and_holds_nothing
            needs [Root, Nft]
        ),
        host_test!(
            multi_thread tap_vms_of_a_vo_get_its_vlans_bridge_made_on_the_first_and_removed_after_the_last
            needs [Root, Nft, Python3]
        ),
        host_test!(
            multi_thread vlan_filtering_where_the_kernel_has_none_fails_with_its_reason_and_holds_nothing
            needs [Root, Nft]
        ),
    ])
}
