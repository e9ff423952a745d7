//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use tonic::transport::{Identity, Server, ServerTlsConfig};
use wnodes_bus::BusError;
use wnodes_testkit::error_rule::{boxed_source, io_source};

use crate::{BridgeError, agent_wire::WireError, validate::InvalidInput};

fn invalid_input() -> InvalidInput {
    InvalidInput {
        field: "job.run.job_id".into(),
        why: "is required".into(),
    }
}

/// A `tonic::transport::Error` as a server identity that is not PEM gives it.
fn transport_error() -> tonic::transport::Error {
    wnodes_bus::connect::install_crypto_provider();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem("no cert", "no key"));
    Server::builder().tls_config(tls).err().unwrap()
}

/// A `prost::DecodeError` as bytes that are no message give it.
fn decode_error() -> prost::DecodeError {
    use prost::Message;
    wnodes_bus::proto::AgentMessage::decode(&[0xff_u8, 0xff][..]).unwrap_err()
}

wnodes_testkit::error_rule! {
    WireError {
        WireError::Io(_) => WireError::Io(io_source()),
        WireError::TooLarge(_) => WireError::TooLarge(1 << 30),
        WireError::Decode(_) => WireError::Decode(decode_error()),
    }
    InvalidInput {
        InvalidInput { .. } => invalid_input(),
    }
    BridgeError {
        BridgeError::Bus(_) => BridgeError::Bus(BusError::NotProvisioned {
            what: "WNODES_EVENTS".into(),
            source: boxed_source(),
        }),
        BridgeError::JetStream(_) => BridgeError::JetStream(boxed_source()),
        BridgeError::WatchEnded => BridgeError::WatchEnded,
        BridgeError::Invalid(_) => BridgeError::Invalid(invalid_input()),
        BridgeError::Config(_) => BridgeError::Config("bridge.tls_key: required with bridge.tls_cert".into()),
        BridgeError::Read { .. } => BridgeError::Read {
            path: "/etc/wnodes/bridge.pem".into(),
            source: io_source(),
        },
        BridgeError::Transport(_) => BridgeError::Transport(transport_error()),
        BridgeError::Listen { .. } => BridgeError::Listen {
            addr: ([127, 0, 0, 1], 50051).into(),
            source: io_source(),
        },
    }
}
