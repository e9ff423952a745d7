//! Spans out of the stack's private network namespace: [`OtlpRelay`].
//!
//! In tap mode the stack runs in a network namespace of its own, where `127.0.0.1` is not the
//! host's loopback, so a trace receiver listening on the host (`http://127.0.0.1:4317`) cannot be
//! reached from the services. The relay listens on `127.0.0.1:<port>` inside the stack's
//! namespace (the services export there) and relays every connection, byte for byte, to the
//! user's endpoint over a socket made in the host's namespace: each connection gets a thread that
//! `setns`es into the host's namespace before it connects (a socket stays in the namespace it was
//! made in, whichever thread uses it later). OTLP/gRPC is plain HTTP/2 over TCP, so nothing above
//! TCP is touched.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context;

use crate::netns::HostNetns;

/// `http://HOST:PORT` (a trailing `/` allowed; HOST a name, an IPv4 address or `[IPv6]`) →
/// `(HOST, PORT)`. Anything else is refused: the relay carries plain TCP, so it cannot keep a
/// TLS endpoint's name, and an OTLP/gRPC endpoint has no path.
pub fn parse_http_endpoint(endpoint: &str) -> anyhow::Result<(String, u16)> {
    let bad = || {
        anyhow::anyhow!(
            "OTLP endpoint {endpoint:?}: a relayed endpoint must be http://HOST:PORT \
             (plain OTLP/gRPC, e.g. http://127.0.0.1:4317)"
        )
    };
    let authority = endpoint
        .strip_prefix("http://")
        .map(|rest| rest.strip_suffix('/').unwrap_or(rest))
        .ok_or_else(bad)?;
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').ok_or_else(bad)?,
        None => host,
    };
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    let port: u16 = port.parse().map_err(|_| bad())?;
    if !valid_host || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// A TCP relay from `127.0.0.1:<port>` in the calling thread's network namespace to an OTLP
/// endpoint in another ([`HostNetns`]). Dropping it stops accepting; connections already relayed
/// run until either side closes them.
#[derive(Debug)]
pub struct OtlpRelay {
    local: SocketAddr,
    target: String,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl OtlpRelay {
    /// Binds `127.0.0.1:0` in the calling thread's namespace and relays what it accepts to
    /// `endpoint` ([`parse_http_endpoint`]), connecting from `netns`. Fails at once when the
    /// endpoint is not `http://HOST:PORT` or the namespace cannot be entered (not root).
    pub fn start(endpoint: &str, netns: Arc<HostNetns>) -> anyhow::Result<Self> {
        let (host, port) = parse_http_endpoint(endpoint)?;
        // Fail here, not on the first span, when setns is not allowed.
        std::thread::scope(|s| s.spawn(|| netns.enter_on_this_thread()).join())
            .map_err(|_| anyhow::anyhow!("the setns probe thread panicked"))??;
        let listener =
            TcpListener::bind("127.0.0.1:0").context("binding the OTLP relay on 127.0.0.1")?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = stop.clone();
            let host = host.clone();
            std::thread::Builder::new()
                .name("otlp-relay".into())
                .spawn(move || accept_loop(&listener, &stop, &host, port, &netns))
                .context("starting the OTLP relay thread")?
        };
        Ok(Self {
            local,
            target: endpoint.to_owned(),
            stop,
            accept: Some(accept),
        })
    }

    /// `http://127.0.0.1:<port>`: the endpoint to give the services.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.local)
    }

    /// The endpoint connections are relayed to, as given.
    pub fn target(&self) -> &str {
        &self.target
    }
}

impl Drop for OtlpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    host: &str,
    port: u16,
    netns: &Arc<HostNetns>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(inbound) => {
                let (host, netns) = (host.to_owned(), netns.clone());
                // A connection that cannot get a thread is dropped: the exporter retries.
                let _ = std::thread::Builder::new()
                    .name("otlp-relay-conn".into())
                    .spawn(move || relay(inbound, &host, port, &netns));
            }
            // EMFILE and the like: do not spin.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Connects to `host:port` from `netns` (this thread moves there) and copies both ways until
/// both sides are done. A failed connect closes `inbound`: the exporter sees a failed export.
fn relay(inbound: TcpStream, host: &str, port: u16, netns: &HostNetns) {
    if netns.enter_on_this_thread().is_err() {
        return;
    }
    let Ok(outbound) = TcpStream::connect((host, port)) else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (Ok(inbound2), Ok(outbound2)) = (inbound.try_clone(), outbound.try_clone()) else {
        return;
    };
    let up = std::thread::Builder::new()
        .name("otlp-relay-up".into())
        .spawn(move || pipe(inbound2, outbound2));
    pipe(outbound, inbound);
    if let Ok(up) = up {
        let _ = up.join();
    }
}

/// Copies `from` → `to`; on end of stream half-closes `to`, on an error closes both.
fn pipe(mut from: TcpStream, to: TcpStream) {
    match io::copy(&mut from, &mut &to) {
        Ok(_) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(_) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_host_port_endpoints_are_relayed() {
        assert_eq!(
            parse_http_endpoint("http://127.0.0.1:4317").ok(),
            Some(("127.0.0.1".into(), 4317))
        );
        assert_eq!(
            parse_http_endpoint("http://localhost:4317/").ok(),
            Some(("localhost".into(), 4317))
        );
        assert_eq!(
            parse_http_endpoint("http://[::1]:4317").ok(),
            Some(("::1".into(), 4317))
        );
        for bad in [
            "https://127.0.0.1:4317",
            "127.0.0.1:4317",
            "http://127.0.0.1",
            "http://127.0.0.1:0",
            "http://127.0.0.1:4317/v1/traces",
            "http://:4317",
            "http://a b:4317",
            "http://[::1:4317",
        ] {
            let e = parse_http_endpoint(bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("http://HOST:PORT") && e.contains(bad)),
                "{bad}: {e:?}"
            );
        }
    }
}
