//! Per-VM SFTP listeners, in process: a tokio `TcpListener` that accepts only the VM's address
//! and pipes each connection into its own `sftp-server`, started through `setpriv` as the job's
//! uid/gid with no supplementary groups (never root). Plain TCP, no ssh: the guest mounts it
//! with `sshfs -o directport=<port>`.
//!
//! ```text
//! guest sshfs ──TCP──▶ listener (bind:port) ──peer == allowed?──no──▶ closed, logged
//!                                              └─yes─▶ setpriv --reuid U --regid G --clear-groups
//!                                                       --no-new-privs
//!                                                       -- sftp-server -d <export> [-R]
//!                                                       socket ⇄ stdin/stdout
//! ```
//!
//! Stopping a listener closes it and kills its `sftp-server` children (and waits for them).
//! The bytes piped each way are counted per listener ([`Traffic`]): what the gateway carried
//! for the VM, reported when the listener stops (when it ran for the VM's whole life in this
//! process; a listener re-opened after a restart does not know what went before).

use parking_lot::Mutex;
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader, ReadBuf},
    net::{TcpListener, TcpStream},
    process::Command,
    task::{JoinHandle, JoinSet},
};
use tokio_util::sync::CancellationToken;

/// What one VM's listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSpec {
    pub vm_id: String,
    /// The only peer address accepted.
    pub allowed: IpAddr,
    /// The export: `sftp-server -d <path>`.
    pub path: PathBuf,
    /// `sftp-server -R`.
    pub read_only: bool,
    pub uid: u32,
    pub gid: u32,
    /// User-mode networking: the VM's own host uid (its qemu's, `VmSpec.vm_user`). On
    /// loopback every local process and every other user-mode guest (slirp connects from
    /// 127.0.0.1) shares the allowed address, so a connection is served only when the socket at
    /// its other end belongs to this uid ([`peer_socket_uid`]): the VM's qemu, no one else.
    pub peer_uid: Option<u32>,
}

/// The uid owning the local TCP socket `peer` that is connected to `local` (this host, this
/// network namespace), from `/proc/thread-self/net/tcp` and `tcp6`.
pub fn peer_socket_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|text| find_socket_uid(&text, peer, local))
}

/// In a `/proc/net/tcp{,6}` text, the uid of the socket whose local address is `sock` and
/// remote address `remote`.
pub fn find_socket_uid(text: &str, sock: SocketAddr, remote: SocketAddr) -> Option<u32> {
    text.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 8 {
            return None;
        }
        (parse_proc_addr(cols[1])? == sock && parse_proc_addr(cols[2])? == remote)
            .then(|| cols[7].parse().ok())
            .flatten()
    })
}

/// `0100007F:1F90` (IPv4, the kernel's byte order) or a 32-digit IPv6 address and a port, as
/// `/proc/net/tcp{,6}` writes them.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: IpAddr = match ip.len() {
        8 => std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_le_bytes()).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, word) in bytes.chunks_mut(4).enumerate() {
                let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
                word.copy_from_slice(&w.to_le_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The programs run per connection.
#[derive(Debug, Clone)]
pub struct Programs {
    pub setpriv: PathBuf,
    pub sftp_server: PathBuf,
    /// Each `sftp-server` in a jail of its own (root only); `None`: `setpriv` alone.
    pub jail: Option<Jail>,
}

/// Where each `sftp-server` runs: a mount namespace of its own (`unshare --mount`), whose root
/// (`chroot`) is a small tmpfs holding only the export (bound at its host path, `nosuid`,
/// `nodev`, read-only for a read-only export), `/dev/null`, an `/etc/passwd` and `/etc/group`
/// holding only the job's own entries (`sftp-server` looks its user up), and, read-only,
/// `sftp-server` and the libraries it loads ([`parse_ldd`]). `..` from the export and symlinks placed in it (absolute or
/// relative) end inside that tmpfs; `/etc`, `/root` or another VM's export do not exist there.
/// `chroot --userspec --groups` drops to the job's uid and gid before `sftp-server` runs.
#[derive(Debug, Clone)]
pub struct Jail {
    /// util-linux `unshare`.
    pub unshare: PathBuf,
    /// coreutils `chroot`.
    pub chroot: PathBuf,
    /// An empty directory: each session mounts its own tmpfs on it, in its own namespace.
    pub root: PathBuf,
    /// What `sftp-server` loads (`ldd`): bound read-only into the jail at the same paths.
    pub libs: Vec<PathBuf>,
}

/// `sh -c JAIL_PROGRAM wnodes-sftp-jail <root> <export> <ro 0|1> <uid> <gid> <chroot>
/// <sftp-server> <lib>...`, run inside `unshare --mount` (propagation private): builds the
/// jail (see [`Jail`]) and execs `chroot` into it as the job's uid and gid. Every path and id
/// is a positional parameter, never part of the program text. stdout is kept for SFTP: the
/// setup's own output goes to stderr.
pub const JAIL_PROGRAM: &str = r#"set -eu
exec 3>&1 1>&2
root=$1 export=$2 ro=$3 uid=$4 gid=$5 chroot=$6 sftp=$7; shift 7
mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev wnodes-sftp "$root"
for f in "$sftp" "$@"; do
  mkdir -p "$root${f%/*}"; : > "$root$f"
  mount --bind "$f" "$root$f"; mount -o remount,bind,ro,nosuid,nodev "$root$f"
done
mkdir -p "$root/dev"; : > "$root/dev/null"; mount --bind /dev/null "$root/dev/null"
mkdir -p "$root/etc"; getent passwd "$uid" > "$root/etc/passwd"; getent group "$gid" > "$root/etc/group" || :
mkdir -p "$root$export"
mount --bind "$export" "$root$export"
if [ "$ro" = 1 ]; then
  mount -o remount,bind,ro,nosuid,nodev "$root$export"
  exec "$chroot" --userspec="$uid:$gid" --groups="$gid" "$root" "$sftp" -d "$export" -R 1>&3 3>&-
fi
mount -o remount,bind,nosuid,nodev "$root$export"
exec "$chroot" --userspec="$uid:$gid" --groups="$gid" "$root" "$sftp" -d "$export" 1>&3 3>&-
"#;

/// The files a dynamically linked program loads, from `ldd`'s output: `name => /path (addr)`
/// and `/path (addr)` lines; the vDSO (no path) is skipped. An error names a line that is
/// neither (`not found`, or `not a dynamic executable`).
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once(" => ") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.starts_with("linux-vdso") || line.starts_with("linux-gate") {
            continue;
        } else {
            return Err(format!("unexpected ldd line {line:?}"));
        }
    }
    if libs.is_empty() {
        return Err("ldd listed no library".into());
    }
    Ok(libs)
}

impl Programs {
    /// The program and argv run for one connection: the jail when configured and root, else
    /// `setpriv` (with its arguments).
    pub fn command(&self, spec: &ServeSpec) -> (PathBuf, Vec<std::ffi::OsString>) {
        let root = nix::unistd::geteuid().is_root();
        match &self.jail {
            Some(jail) if root => (jail.unshare.clone(), self.jail_args(jail, spec)),
            _ => (self.setpriv.clone(), self.args_as(spec, root)),
        }
    }

    /// `unshare`'s arguments for one jailed session.
    pub fn jail_args(&self, jail: &Jail, spec: &ServeSpec) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "--".into(),
            "/bin/sh".into(),
            "-c".into(),
            JAIL_PROGRAM.into(),
            "wnodes-sftp-jail".into(),
            jail.root.clone().into(),
            spec.path.clone().into(),
            if spec.read_only { "1" } else { "0" }.into(),
            spec.uid.to_string().into(),
            spec.gid.to_string().into(),
            jail.chroot.clone().into(),
            self.sftp_server.clone().into(),
        ];
        a.extend(jail.libs.iter().map(|l| l.clone().into()));
        a
    }

    /// The argv for a gateway running as root (`privileged`) or not. Without root,
    /// `--clear-groups` fails (`setgroups` needs `CAP_SETGID`) and every connection would die at
    /// once; the service only serves its own uid then (no identity change), so the process's
    /// groups are kept instead.
    pub fn args_as(&self, spec: &ServeSpec, privileged: bool) -> Vec<std::ffi::OsString> {
        let groups = if privileged {
            "--clear-groups"
        } else {
            "--keep-groups"
        };
        let mut a: Vec<std::ffi::OsString> = vec![
            format!("--reuid={}", spec.uid).into(),
            format!("--regid={}", spec.gid).into(),
            groups.into(),
            "--no-new-privs".into(),
            "--".into(),
            self.sftp_server.clone().into(),
            "-d".into(),
            spec.path.clone().into(),
        ];
        if spec.read_only {
            a.push("-R".into());
        }
        a
    }
}

/// Bytes a listener's sessions piped, each way (SFTP on the wire).
#[derive(Debug, Default)]
pub struct Counters {
    to_vm: AtomicU64,
    from_vm: AtomicU64,
}

/// What a listener carried: bytes to the VM and from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub to_vm: u64,
    pub from_vm: u64,
}

/// A stopped listener: where it listened, how many connections it served, and what it
/// carried when it counted all of it (`None` for a listener re-opened after a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub addr: SocketAddr,
    pub served: usize,
    pub traffic: Option<Traffic>,
}

/// An `AsyncRead` that adds what it reads to a counter.
struct Counted<R> {
    inner: R,
    counter: Arc<Counters>,
    to_vm: bool,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = (buf.filled().len() - before) as u64;
            let c = if self.to_vm {
                &self.counter.to_vm
            } else {
                &self.counter.from_vm
            };
            c.fetch_add(n, Ordering::Relaxed);
        }
        polled
    }
}

struct Running {
    addr: SocketAddr,
    spec: ServeSpec,
    cancel: CancellationToken,
    task: JoinHandle<usize>,
    counters: Arc<Counters>,
    /// Started when the VM's storage was prepared (not re-opened after a restart).
    whole: bool,
}

/// The running listeners, by VM id.
#[derive(Clone)]
pub struct Listeners {
    programs: Programs,
    running: Arc<Mutex<HashMap<String, Running>>>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vms: Vec<String> = self.running.lock().keys().cloned().collect();
        f.debug_struct("Listeners")
            .field("programs", &self.programs)
            .field("vms", &vms)
            .finish()
    }
}

impl Listeners {
    pub fn new(programs: Programs) -> Self {
        Self {
            programs,
            running: Arc::default(),
        }
    }

    /// The address of `vm_id`'s listener, if one runs.
    pub fn addr_of(&self, vm_id: &str) -> Option<SocketAddr> {
        self.running
            .lock()
            .get(vm_id)
            .filter(|r| !r.task.is_finished())
            .map(|r| r.addr)
    }

    /// Starts serving `spec` on an already bound listener (replacing a previous one of the VM).
    /// `whole`: the VM's first listener, whose count of bytes is the VM's whole traffic (not
    /// one re-opened after a restart).
    pub fn start(
        &self,
        listener: TcpListener,
        spec: ServeSpec,
        whole: bool,
    ) -> std::io::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(serve(
            listener,
            spec.clone(),
            self.programs.clone(),
            cancel.clone(),
            counters.clone(),
        ));
        tracing::info!(vm_id = %spec.vm_id, %addr, allowed = %spec.allowed, path = %spec.path.display(), read_only = spec.read_only, uid = spec.uid, gid = spec.gid, "SFTP listener started.");
        let old = {
            let mut m = self.running.lock();
            m.insert(
                spec.vm_id.clone(),
                Running {
                    addr,
                    spec,
                    cancel,
                    task,
                    counters,
                    whole,
                },
            )
        };
        if let Some(old) = old {
            old.cancel.cancel();
        }
        Ok(addr)
    }

    /// The spec a running listener of `vm_id` serves.
    pub fn spec_of(&self, vm_id: &str) -> Option<ServeSpec> {
        self.running.lock().get(vm_id).map(|r| r.spec.clone())
    }

    /// Stops `vm_id`'s listener: closes it, kills its sftp-server processes and waits for them.
    /// Returns what it did, or `None` when none ran.
    pub async fn stop(&self, vm_id: &str) -> Option<Stopped> {
        let running = self.running.lock().remove(vm_id)?;
        running.cancel.cancel();
        let served = running.task.await.unwrap_or_default();
        let traffic = Traffic {
            to_vm: running.counters.to_vm.load(Ordering::Relaxed),
            from_vm: running.counters.from_vm.load(Ordering::Relaxed),
        };
        tracing::info!(%vm_id, addr = %running.addr, served, bytes_to_vm = traffic.to_vm, bytes_from_vm = traffic.from_vm, whole = running.whole, "SFTP listener stopped.");
        Some(Stopped {
            addr: running.addr,
            served,
            traffic: running.whole.then_some(traffic),
        })
    }

    /// Stops every listener (service shutdown).
    pub async fn stop_all(&self) {
        let vms: Vec<String> = self.running.lock().keys().cloned().collect();
        for vm in vms {
            self.stop(&vm).await;
        }
    }
}

/// Accepts until cancelled; returns how many connections were served.
async fn serve(
    listener: TcpListener,
    spec: ServeSpec,
    programs: Programs,
    cancel: CancellationToken,
    counters: Arc<Counters>,
) -> usize {
    let mut sessions = JoinSet::new();
    let mut served = 0usize;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) if peer.ip() == spec.allowed && !peer_uid_matches(&sock, peer, spec.peer_uid) => {
                    tracing::warn!(vm_id = %spec.vm_id, %peer, vm_uid = spec.peer_uid, "SFTP connection from a process that is not the VM's qemu refused.");
                    drop(sock);
                }
                Ok((sock, peer)) if peer.ip() == spec.allowed => {
                    served += 1;
                    tracing::info!(vm_id = %spec.vm_id, %peer, "SFTP connection accepted.");
                    sessions.spawn(session(sock, peer, spec.clone(), programs.clone(), cancel.clone(), counters.clone()));
                }
                Ok((sock, peer)) => {
                    tracing::warn!(vm_id = %spec.vm_id, %peer, allowed = %spec.allowed, "SFTP connection from a foreign address refused.");
                    drop(sock);
                }
                Err(e) => {
                    tracing::warn!(vm_id = %spec.vm_id, error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    while sessions.join_next().await.is_some() {}
    served
}

/// True when no peer uid is required, or the peer's socket belongs to `want`.
fn peer_uid_matches(sock: &TcpStream, peer: SocketAddr, want: Option<u32>) -> bool {
    let Some(want) = want else {
        return true;
    };
    let Ok(local) = sock.local_addr() else {
        return false;
    };
    peer_socket_uid(peer, local) == Some(want)
}

/// The copy buffer each way: a pipe's default capacity.
const COPY_BUFFER: usize = 64 * 1024;

/// One connection: an sftp-server as the job's user, piped to the socket.
async fn session(
    sock: TcpStream,
    peer: SocketAddr,
    spec: ServeSpec,
    programs: Programs,
    cancel: CancellationToken,
    counters: Arc<Counters>,
) {
    let vm_id = spec.vm_id.as_str();
    let (program, args) = programs.command(&spec);
    let mut cmd = Command::new(&program);
    cmd.args(args)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%vm_id, %peer, program = %program.display(), error = %e, "Cannot start sftp-server.");
            return;
        }
    };
    let (Some(mut cin), Some(cout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill().await;
        return;
    };
    if let Some(err) = child.stderr.take() {
        let vm = vm_id.to_owned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::warn!(vm_id = %vm, "sftp-server: {line}");
            }
        });
    }
    // SFTP is request/response: a reply's last segment must not wait for the client's
    // delayed ACK (Nagle).
    if let Err(e) = sock.set_nodelay(true) {
        tracing::debug!(%vm_id, %peer, error = %e, "Cannot set TCP_NODELAY.");
    }
    let (rd, mut wr) = sock.into_split();
    // Buffers as large as a pipe: one read per pipe-full rather than tokio's 8 KiB default.
    let mut rd = BufReader::with_capacity(
        COPY_BUFFER,
        Counted {
            inner: rd,
            counter: counters.clone(),
            to_vm: false,
        },
    );
    let mut cout = BufReader::with_capacity(
        COPY_BUFFER,
        Counted {
            inner: cout,
            counter: counters,
            to_vm: true,
        },
    );
    let up = tokio::spawn(async move {
        let r = tokio::io::copy_buf(&mut rd, &mut cin).await;
        drop(cin); // EOF to sftp-server: it exits
        r
    });
    tokio::select! {
        _ = cancel.cancelled() => {
            tracing::info!(%vm_id, %peer, "Listener stopped: killing the session's sftp-server.");
        }
        r = tokio::io::copy_buf(&mut cout, &mut wr) => {
            if let Err(e) = r {
                tracing::debug!(%vm_id, %peer, error = %e, "Session ended with an error.");
            }
        }
    }
    up.abort();
    let _ = child.start_kill();
    match child.wait().await {
        Ok(status) => tracing::debug!(%vm_id, %peer, %status, "sftp-server exited."),
        Err(e) => tracing::warn!(%vm_id, %peer, error = %e, "Cannot reap sftp-server."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_socket_is_found_in_proc_net_tcp() {
        // /proc/net/tcp of this host: a listener on 127.0.0.1:20001 and both ends of a
        // connection to it from 127.0.0.1:45678, the client's socket owned by uid 3000000000.
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:4E21 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4011 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:B26E 0100007F:4E21 01 00000000:00000000 00:00000000 00000000 3000000000        0 4012 1 0000000000000000 20 4 30 10 -1\n   2: 0100007F:4E21 0100007F:B26E 01 00000000:00000000 00:00000000 00000000     0        0 4013 1 0000000000000000 20 4 30 10 -1\n";
        let client: SocketAddr = "127.0.0.1:45678".parse().unwrap();
        let server: SocketAddr = "127.0.0.1:20001".parse().unwrap();
        assert_eq!(find_socket_uid(text, client, server), Some(3_000_000_000));
        assert_eq!(find_socket_uid(text, server, client), Some(0));
        let other: SocketAddr = "127.0.0.1:45679".parse().unwrap();
        assert_eq!(find_socket_uid(text, other, server), None);
        // tcp6: an IPv4-mapped loopback address.
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0000000000000000FFFF00000100007F:B26E 0000000000000000FFFF00000100007F:4E21 01 00000000:00000000 00:00000000 00000000  1000        0 5 1 0 20 4 30 10 -1\n";
        assert_eq!(find_socket_uid(v6, client, server), Some(1000));
    }

    #[test]
    fn ldd_output_is_parsed() {
        // Debian 12's `ldd /usr/lib/openssh/sftp-server`.
        let text = "\tlinux-vdso.so.1 (0x00007ffd1b3e5000)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0e4c1f3000)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f0e4c416000)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(err.contains("libfoo"), "{err}");
        assert!(parse_ldd("\tnot a dynamic executable\n").is_err());
        assert!(parse_ldd("").is_err());
    }

    #[test]
    fn a_jailed_session_passes_every_value_as_a_parameter() {
        let p = Programs {
            setpriv: "/usr/bin/setpriv".into(),
            sftp_server: "/usr/lib/openssh/sftp-server".into(),
            jail: Some(Jail {
                unshare: "/usr/bin/unshare".into(),
                chroot: "/usr/sbin/chroot".into(),
                root: "/var/lib/wnodes/gateway/jail".into(),
                libs: vec!["/lib/x86_64-linux-gnu/libc.so.6".into()],
            }),
        };
        let spec = ServeSpec {
            vm_id: "vm-000000000001".into(),
            allowed: IpAddr::from([127, 0, 0, 1]),
            path: "/export/it's $(id)".into(),
            read_only: false,
            uid: 1000,
            gid: 1001,
            peer_uid: None,
        };
        let args = p.jail_args(p.jail.as_ref().unwrap(), &spec);
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            &args[..6],
            ["--mount", "--propagation", "private", "--", "/bin/sh", "-c"]
        );
        assert_eq!(args[6], JAIL_PROGRAM);
        assert!(
            !JAIL_PROGRAM.contains("/export"),
            "no value in the program text"
        );
        assert_eq!(
            &args[7..],
            [
                "wnodes-sftp-jail",
                "/var/lib/wnodes/gateway/jail",
                "/export/it's $(id)",
                "0",
                "1000",
                "1001",
                "/usr/sbin/chroot",
                "/usr/lib/openssh/sftp-server",
                "/lib/x86_64-linux-gnu/libc.so.6"
            ]
        );
    }

    #[test]
    fn groups_are_cleared_as_root_and_kept_without_root() {
        let p = Programs {
            setpriv: "/usr/bin/setpriv".into(),
            sftp_server: "/usr/lib/openssh/sftp-server".into(),
            jail: None,
        };
        let spec = ServeSpec {
            vm_id: "vm-000000000001".into(),
            allowed: IpAddr::from([127, 0, 0, 1]),
            path: "/export".into(),
            read_only: true,
            uid: 1000,
            gid: 1000,
            peer_uid: None,
        };
        let s = |a: Vec<std::ffi::OsString>| -> Vec<String> {
            a.into_iter()
                .map(|x| x.to_string_lossy().into_owned())
                .collect()
        };
        let root = s(p.args_as(&spec, true));
        assert_eq!(
            root,
            [
                "--reuid=1000",
                "--regid=1000",
                "--clear-groups",
                "--no-new-privs",
                "--",
                "/usr/lib/openssh/sftp-server",
                "-d",
                "/export",
                "-R"
            ]
        );
        let user = s(p.args_as(&spec, false));
        assert_eq!(user[2], "--keep-groups");
        assert!(!user.contains(&"--clear-groups".to_owned()));
    }
}
