//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use std::net::Ipv4Addr;

use wnodes_testkit::error_rule::io_source;

use crate::{
    config::{CidrError, Ipv4Net, NetworkConfigError},
    host::HostError,
    lease::{Exhausted, NoVf},
    netlink::NetlinkError,
    reconcile::ReconcileError,
    service::PrepareError,
    sriov::SriovError,
};

fn sriov_error() -> SriovError {
    SriovError::Read {
        path: "/sys/class/net/ens1f0/device/sriov_numvfs".into(),
        source: io_source(),
    }
}

fn net(addr: [u8; 4], prefix: u8) -> Ipv4Net {
    Ipv4Net {
        addr: Ipv4Addr::from(addr),
        prefix,
    }
}

fn netlink_error() -> NetlinkError {
    NetlinkError::Open {
        namespace: "network namespace wn-test".into(),
        source: io_source(),
    }
}

fn host_error() -> HostError {
    HostError::Spawn {
        cmd: "ip link add wn-0123456789ab type tuntap".into(),
        source: io_source(),
    }
}

wnodes_testkit::error_rule! {
    NetworkConfigError {
        NetworkConfigError::Pool(_) => NetworkConfigError::Pool(
            "10.0.0.0/33".parse::<Ipv4Net>().unwrap_err(),
        ),
        NetworkConfigError::PoolRequired => NetworkConfigError::PoolRequired,
        NetworkConfigError::Bridge(_) => NetworkConfigError::Bridge("br;x".into()),
        NetworkConfigError::Netns(_) => NetworkConfigError::Netns(host_error()),
        NetworkConfigError::Sriov(_) => NetworkConfigError::Sriov(
            "gateway 10.231.3.1 is not inside pool 10.231.2.0/24".into(),
        ),
        NetworkConfigError::Vlan(_) => NetworkConfigError::Vlan(
            "networks.100.pool: 10.231.101.0/24 is not inside 10.231.100.1/24".into(),
        ),
    }
    SriovError {
        SriovError::NotSriov { .. } => SriovError::NotSriov {
            pf: "eth0".into(),
            path: "/sys/class/net/eth0/device/sriov_totalvfs".into(),
        },
        SriovError::Read { .. } => sriov_error(),
        SriovError::NotANumber { .. } => SriovError::NotANumber {
            path: "/sys/class/net/eth0/device/sriov_numvfs".into(),
            said: "many".into(),
        },
        SriovError::BadLink { .. } => SriovError::BadLink {
            path: "/sys/class/net/eth0/device/virtfn0".into(),
            target: "../not-pci".into(),
        },
    }
    NoVf {
        NoVf::AllHeld { .. } => NoVf::AllHeld { pfs: "ens1f0, ens1f1".into(), held: 14 },
        NoVf::Exhausted(_) => NoVf::Exhausted(Exhausted { pool: net([10, 231, 2, 0], 30), in_use: 2 }),
    }
    ReconcileError {
        ReconcileError::Table(_) => ReconcileError::Table(wnodes_preparer::TableError::Table {
            op: "read the prepared rows",
            kind: wnodes_preparer::Kind::Network,
            source: sqlx::Error::Protocol(wnodes_testkit::error_rule::SOURCE_TEXT.into()),
        }),
        ReconcileError::Host(_) => ReconcileError::Host(host_error()),
    }
    NetlinkError {
        NetlinkError::Open { .. } => netlink_error(),
        NetlinkError::Request { .. } => NetlinkError::Request {
            op: "delete",
            name: "wn-0123456789ab".into(),
            source: rtnetlink::Error::RequestFailed,
        },
        NetlinkError::NoLink { .. } => NetlinkError::NoLink {
            op: "attach to a bridge",
            name: "wnbr0".into(),
        },
    }
    HostError {
        HostError::Spawn { .. } => host_error(),
        HostError::Failed { .. } => HostError::Failed {
            cmd: "ip link set wn-0123456789ab up".into(),
            status: "exit status: 2".into(),
            stderr: "RTNETLINK answers: Operation not permitted".into(),
        },
        HostError::Parse { .. } => HostError::Parse {
            cmd: "ip -j addr show wnbr0".into(),
            why: "expected value at line 1 column 1".into(),
        },
        HostError::InvalidName { .. } => HostError::InvalidName {
            kind: "interface name",
            name: "wn;rm".into(),
        },
        HostError::Netlink(_) => HostError::Netlink(netlink_error()),
        HostError::Sriov(_) => HostError::Sriov(sriov_error()),
    }
    CidrError {
        CidrError { .. } => CidrError { value: "10.0.0.0/33".into(), why: "prefix above 32" },
    }
    Exhausted {
        Exhausted { .. } => Exhausted { pool: net([10, 231, 1, 0], 30), in_use: 2 },
    }
    PrepareError {
        PrepareError::BadVmId(_) => PrepareError::BadVmId("vm-XYZ".into()),
        PrepareError::BridgeMissing(_) => PrepareError::BridgeMissing("wnbr0".into()),
        PrepareError::Bridge { .. } => PrepareError::Bridge {
            bridge: "wnbr0".into(),
            source: host_error(),
        },
        PrepareError::Unsupported(_) => PrepareError::Unsupported("SR-IOV"),
        PrepareError::TapUnavailable => PrepareError::TapUnavailable,
        PrepareError::NoPool => PrepareError::NoPool,
        PrepareError::PoolOutsideBridge { .. } => PrepareError::PoolOutsideBridge {
            pool: net([10, 231, 2, 0], 24),
            bridge: net([10, 231, 1, 0], 24),
        },
        PrepareError::Exhausted(_) => PrepareError::Exhausted(Exhausted {
            pool: net([10, 231, 1, 0], 30),
            in_use: 2,
        }),
        PrepareError::Tap { .. } => PrepareError::Tap {
            tap: "wn-0123456789ab".into(),
            source: host_error(),
        },
        PrepareError::SriovOff => PrepareError::SriovOff,
        PrepareError::Vfs(_) => PrepareError::Vfs(sriov_error()),
        PrepareError::NoVf(_) => PrepareError::NoVf(NoVf::AllHeld { pfs: "ens1f0".into(), held: 7 }),
        PrepareError::SetVf { .. } => PrepareError::SetVf {
            pf: "ens1f0".into(),
            index: 3,
            source: host_error(),
        },
        PrepareError::NoVlanNetwork(_) => PrepareError::NoVlanNetwork(100),
        PrepareError::Vlan { .. } => PrepareError::Vlan {
            vid: 100,
            source: host_error(),
        },
    }
}
