//! What the gateway's fuzz target checks (`fuzz/`, run by hand with `scripts/fuzz.sh gateway`),
//! shared with the test that replays its committed corpus (`tests/fuzz_corpus.rs`), so a crash
//! input stays a regression test.
//!
//! [`exercise_gateway`] reads the first line of its input as the part of the gateway to run and
//! the rest as that part's input; nothing may panic, and what is accepted must be harmless:
//!
//! - `plan`: a VM's spec and its `network.ready` (newline-separated fields, see `fn plan`)
//!   through the handler's checks (`GatewayHandler::plan`, the export path check included),
//!   with a configuration from the input (through [`GatewayConfig::validate`]; the default
//!   when refused) and the `exportfs` backend as the NFS server. The exports live in a small
//!   directory tree built once per process under the temporary directory ([`tree`]): two export
//!   roots, a job's directory, symlinks that lead out of the roots and one that stays in, a
//!   file, and directories whose names an NFS export cannot carry. An accepted export is an
//!   existing directory, the host path with every symlink and `..` resolved (absolute, no `.`
//!   or `..` left), under a configured root; its owner's uid and gid lie in `job_uids` and
//!   `job_gids` and are never 0. An sshfs listener admits the VM's address only (127.0.0.1 and
//!   the VM's own qemu uid in user-mode networking) and runs as a uid this process can become,
//!   with a passwd entry. An NFS export is planned only when the spec asks for NFS, the network
//!   is not user-mode, the host has an NFS server and the client is the VM's address; its path
//!   has no whitespace, control character, `"` or `\`; and what the gateway would hand the
//!   server carries exactly that: ganesha's `EXPORT` block keeps its template's lines and all
//!   but the insides of its quoted strings, its pseudo path is `<pseudo_root>/<one name>` (the
//!   VM id), `exportfs`' arguments squash to the owner, and the gateway's own parsers read the
//!   export back from `exportfs -v` and ganesha's `ShowExports`/`DisplayExport` replies as
//!   those programs print it. A refusal names a rule the input really breaks.
//! - `config`: the `[gateway]` and `[gateway.nfs]` values (ranges, export roots, export ids,
//!   NFS port, pseudo root) through [`GatewayConfig::validate`]: an accepted range has
//!   `1 <= first <= last` (export ids also `<= 65535`) and prints back as it parsed, an export
//!   root is absolute and does not resolve to `/`, the pseudo root is an absolute path of
//!   `[A-Za-z0-9._-]` names.
//! - `path`: one path through [`check_path`]: it accepts exactly the paths without whitespace,
//!   control characters, `"` and `\`, and an accepted absolute path makes it through the
//!   renderings and parsers above.
//! - `exportfs`, `ganesha`, `tcp`, `ldd`: a program's output through the gateway's parser of it
//!   (`exportfs -v`; ganesha's `ShowExports` and `DisplayExport`; `/proc/net/tcp{,6}`; `ldd`):
//!   whatever they return was in the text, ids in the configured range; a line the kernel writes
//!   for a socket is found.
//! - anything else: the whole input through every parser.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
    sync::{Arc, OnceLock},
};

use wnodes_bus::proto;

use crate::{
    config::{GatewayConfig, IdRange, PortRange},
    listener::{find_socket_uid, parse_ldd},
    nfs::{
        NfsBackend, NfsConfig, NfsExport, NfsServer, check_path,
        exportfs::{self, Exportfs, parse_exportfs_v},
        ganesha::{self, export_block, parse_display_clients, parse_show_exports},
    },
    service::{GatewayHandler, Plan, Refusal},
};

/// What [`exercise_gateway`] made of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `plan`: no export asked for, nothing to serve.
    Nothing,
    /// `plan`: an SFTP listener.
    Sshfs,
    /// `plan`: an NFS export.
    Nfs,
    /// `plan`: refused by this host-policy rule.
    Refused(&'static str),
    /// `plan`: not served for a reason that is no policy rule (no passwd entry, an address that
    /// does not parse, a gateway that cannot become the owner).
    Cannot,
    /// `config`, `path`: accepted.
    Accepted,
    /// `config`, `path`: refused.
    Invalid,
    /// The parsers: how many items they returned.
    Parsed(usize),
    /// `plan`: the directory tree could not be built (nothing checked).
    NoTree,
}

impl Verdict {
    /// Whether the input was accepted (planned, valid, or parsed into something).
    pub fn accepted(self) -> bool {
        match self {
            Self::Nothing | Self::Sshfs | Self::Nfs | Self::Accepted => true,
            Self::Parsed(n) => n > 0,
            Self::Refused(_) | Self::Cannot | Self::Invalid | Self::NoTree => false,
        }
    }
}

/// Runs `data` through the part of the gateway its first line names (see the module doc).
/// Panics when something accepted breaks an invariant.
pub fn exercise_gateway(data: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(data);
    let (section, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let fields: Vec<&str> = rest.split('\n').collect();
    match section {
        "plan" => plan(&fields),
        "config" => config(&fields),
        "path" => path(field(&fields, 0)),
        "exportfs" | "ganesha" | "tcp" | "ldd" => {
            let (head, body) = rest.split_once('\n').unwrap_or((rest, ""));
            Verdict::Parsed(match section {
                "exportfs" => exportfs_text(body, ids_or_default(head)),
                "ganesha" => ganesha_text(body, ids_or_default(head)),
                "tcp" => tcp_text(head, body),
                _ => ldd_text(rest),
            })
        }
        _ => Verdict::Parsed(
            exportfs_text(&text, DEFAULT_IDS)
                + ganesha_text(&text, DEFAULT_IDS)
                + tcp_text("", &text)
                + ldd_text(&text),
        ),
    }
}

/// Field `i` of the newline-separated input (empty when missing).
fn field<'a>(fields: &[&'a str], i: usize) -> &'a str {
    fields.get(i).copied().unwrap_or_default()
}

const DEFAULT_IDS: IdRange = IdRange {
    first: 100,
    last: 9999,
};

fn ids_or_default(s: &str) -> IdRange {
    s.parse().unwrap_or(DEFAULT_IDS)
}

// ---------------------------------------------------------------------------------------------
// The directory tree the exports live in.

/// The tree's directory name under the temporary directory, before the process id.
const TREE_PREFIX: &str = "wnodes-gateway-fuzz-";

/// The directories of the tree (`exports` and `shared` are the default export roots).
const TREE_DIRS: [&str; 7] = [
    "exports/alice/data",
    "exports/odd name",
    "exports/quo\"te",
    "exports/back\\slash",
    "exports/tab\tdir",
    "shared/bob",
    "outside/secret",
];

/// The symlinks of the tree: (link, target).
const TREE_LINKS: [(&str, &str); 5] = [
    ("exports/alice/up", ".."),
    ("exports/alice/out", "../../outside"),
    ("exports/etc", "/etc"),
    ("exports/to-bob", "../shared/bob"),
    ("rootlink", "/"),
];

/// The export roots when the input names none: two that exist and one that does not.
const DEFAULT_ROOTS: &str = "~/exports,~/shared,~/gone";

/// The tree, built at first use, resolved (`~` in a `plan` or `config` path stands for it):
///
/// ```text
/// exports/alice/{data/,notes}   a job's directory
/// exports/alice/up -> ..         stays in the root
/// exports/alice/out -> ../../outside, exports/etc -> /etc      lead out
/// exports/to-bob -> ../shared/bob                              into the other root
/// exports/{odd name,quo"te,back\slash,tab<TAB>dir}/  names NFS cannot carry
/// shared/bob/    outside/secret/    rootlink -> /
/// ```
///
/// It lives in `<tmp>/wnodes-gateway-fuzz-<pid>`; trees of processes that are gone are removed
/// when a new one is built.
pub fn tree() -> Option<&'static Path> {
    static TREE: OnceLock<Option<PathBuf>> = OnceLock::new();
    TREE.get_or_init(|| match build_tree() {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("wnodes-gateway fuzzing: cannot build the directory tree: {e}");
            None
        }
    })
    .as_deref()
}

fn build_tree() -> std::io::Result<PathBuf> {
    let tmp = std::env::temp_dir();
    remove_stale_trees(&tmp);
    let dir = tmp.join(format!("{TREE_PREFIX}{}", std::process::id()));
    if dir.symlink_metadata().is_ok() {
        // Left by an earlier process with this pid.
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir(&dir)?;
    for d in TREE_DIRS {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::write(dir.join("exports/alice/notes"), "not a directory\n")?;
    for (link, target) in TREE_LINKS {
        std::os::unix::fs::symlink(target, dir.join(link))?;
    }
    std::fs::canonicalize(&dir)
}

/// Removes the trees of processes that no longer run (this user's only).
fn remove_stale_trees(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TREE_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let ours = path
            .symlink_metadata()
            .is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// `s` with a leading `~` replaced by the tree.
fn in_tree(tree: &Path, s: &str) -> String {
    match s.strip_prefix('~') {
        Some(rest) => format!("{}{rest}", tree.display()),
        None => s.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// plan

/// The fields of a `plan` input, one a line: storage mode (`nfs`, `sshfs` or a number), network
/// mode (`user`, `tap` or a number), the export's host path, the owner `uid:gid` (empty: none),
/// the VM id, `network.ready`'s address and gateway, how many exports (empty: 1, at most 3),
/// `ro` for a read-only export, the VM's qemu uid (empty: none), `job_uids`, `job_gids`, the
/// export roots (comma-separated; empty: `~/exports,~/shared,~/gone`), `bind_address`, and
/// `none` for a host without `[gateway.nfs]`. An empty range is the default, an invalid
/// configuration the default one.
fn plan(fields: &[&str]) -> Verdict {
    let Some(tree) = tree() else {
        return Verdict::NoTree;
    };
    let f = |i| field(fields, i);
    let storage_mode = match f(0) {
        "nfs" => proto::StorageMode::Nfs as i32,
        "sshfs" => proto::StorageMode::Sshfs as i32,
        other => other.parse().unwrap_or(0),
    };
    let network_mode = match f(1) {
        "user" => proto::NetworkMode::User as i32,
        "tap" => proto::NetworkMode::VirtioTap as i32,
        other => other.parse().unwrap_or(0),
    };
    let host_path = in_tree(tree, f(2));
    let owner = f(3).split_once(':').map(|(u, g)| proto::JobOwner {
        user: String::new(),
        uid: u.trim().parse().unwrap_or(0),
        gid: g.trim().parse().unwrap_or(0),
    });
    let vm_id = f(4);
    let count = if f(7).is_empty() {
        1
    } else {
        f(7).trim().parse::<usize>().unwrap_or(0).min(3)
    };
    let spec = proto::VmSpec {
        vm_id: vm_id.into(),
        exports: (0..count)
            .map(|_| proto::StorageExport {
                name: "home".into(),
                host_path: host_path.clone(),
                guest_path: "/shared".into(),
                read_only: f(8) == "ro",
            })
            .collect(),
        storage_mode,
        network_mode,
        owner,
        vm_user: f(9)
            .trim()
            .parse()
            .ok()
            .map(|uid| proto::HostUser { uid, gid: uid }),
        ..Default::default()
    };
    let net = proto::NetworkReady {
        vm_id: vm_id.into(),
        mode: network_mode,
        address: f(5).into(),
        gateway: f(6).into(),
        ..Default::default()
    };
    let or = |s: &'static str, v: &str| {
        if v.is_empty() {
            s.to_owned()
        } else {
            v.to_owned()
        }
    };
    let roots = |s: &str| -> Vec<PathBuf> {
        s.split(',')
            .map(|r| PathBuf::from(in_tree(tree, r)))
            .collect()
    };
    let cfg = GatewayConfig {
        export_roots: roots(&or(DEFAULT_ROOTS, f(12))),
        job_uids: or("1000-65534", f(10)),
        job_gids: or("1000-65534", f(11)),
        bind_address: f(13).parse().ok(),
        jail: false,
        ..Default::default()
    };
    let mut handler = match GatewayHandler::new(&cfg, "gateway@fuzz".into()) {
        Ok(h) => h,
        // The gateway would not start with it: plan with the default configuration.
        Err(_) => {
            let default = GatewayConfig {
                export_roots: roots(DEFAULT_ROOTS),
                jail: false,
                ..Default::default()
            };
            match GatewayHandler::new(&default, "gateway@fuzz".into()) {
                Ok(h) => h,
                Err(e) => panic!("the default configuration is refused: {e}"),
            }
        }
    };
    if f(14) != "none" {
        let nfs = NfsConfig {
            backend: NfsBackend::Exportfs,
            ..Default::default()
        };
        handler.nfs_ids = nfs.ids().unwrap_or(DEFAULT_IDS);
        handler.nfs_port = nfs.port;
        handler.nfs = Some(Arc::new(NfsServer::Exportfs(Exportfs::new(&nfs))));
    }
    match handler.plan(&spec, &net) {
        Err(Refusal::Policy { rule, .. }) => {
            check_refusal(&handler, &spec, &net, rule);
            Verdict::Refused(rule)
        }
        Err(Refusal::Cannot(_)) => Verdict::Cannot,
        Ok(Plan::Nothing) => {
            assert!(spec.exports.is_empty(), "nothing served for {spec:?}");
            Verdict::Nothing
        }
        Ok(Plan::Serve {
            spec: serve,
            bind,
            guest_path,
        }) => {
            check_export(&handler, &spec, &serve.path, serve.uid, serve.gid);
            assert_ne!(
                spec.storage_mode,
                proto::StorageMode::Nfs as i32,
                "an SFTP listener for a spec that asks for NFS"
            );
            assert_eq!(serve.vm_id, spec.vm_id);
            assert_eq!(serve.read_only, spec.exports[0].read_only);
            assert_eq!(guest_path, spec.exports[0].guest_path);
            let user_mode = net.mode == proto::NetworkMode::User as i32;
            let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
            if user_mode {
                assert_eq!(serve.allowed, loopback, "user-mode client");
                assert_eq!(
                    serve.peer_uid,
                    spec.vm_user.as_ref().map(|u| u.uid),
                    "user mode: only the VM's qemu may connect"
                );
            } else {
                assert_eq!(
                    Some(serve.allowed),
                    vm_address(&net.address),
                    "the listener admits {} for network.ready address {:?}",
                    serve.allowed,
                    net.address
                );
                assert_eq!(serve.peer_uid, None);
            }
            let want_bind = match handler.bind_address {
                Some(b) => Some(b),
                None if user_mode => Some(loopback),
                None => net.gateway.parse().ok(),
            };
            assert_eq!(Some(bind), want_bind, "bind address");
            let me = nix::unistd::geteuid();
            assert!(
                me.is_root() || me.as_raw() == serve.uid,
                "uid {me} cannot run sftp-server as {}",
                serve.uid
            );
            assert!(
                matches!(
                    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(serve.uid)),
                    Ok(Some(_))
                ),
                "uid {} has no passwd entry",
                serve.uid
            );
            Verdict::Sshfs
        }
        Ok(Plan::Nfs { export, guest_path }) => {
            check_export(&handler, &spec, &export.path, export.uid, export.gid);
            assert_eq!(
                spec.storage_mode,
                proto::StorageMode::Nfs as i32,
                "NFS for a spec that does not ask for it"
            );
            assert_ne!(
                net.mode,
                proto::NetworkMode::User as i32,
                "NFS in user-mode networking"
            );
            assert!(handler.nfs.is_some(), "NFS planned without an NFS server");
            assert_eq!(
                Some(export.client),
                vm_address(&net.address),
                "NFS client {} for network.ready address {:?}",
                export.client,
                net.address
            );
            assert_eq!(export.vm_id, spec.vm_id);
            assert_eq!(export.read_only, spec.exports[0].read_only);
            assert_eq!(guest_path, spec.exports[0].guest_path);
            let id = u16::try_from(handler.nfs_ids.first).unwrap_or(u16::MAX);
            let pseudo_root = crate::nfs::config::GaneshaConfig::default().pseudo_root;
            check_rendered(
                &NfsExport {
                    id,
                    ..export.clone()
                },
                &pseudo_root,
                handler.nfs_ids,
            );
            Verdict::Nfs
        }
    }
}

/// The IP address of `network.ready`'s `address` (`10.231.1.2/24`).
fn vm_address(address: &str) -> Option<IpAddr> {
    address.split('/').next()?.parse().ok()
}

/// The configured roots that exist, resolved.
fn resolved_roots(handler: &GatewayHandler) -> Vec<PathBuf> {
    handler
        .export_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect()
}

/// What every served export must be: one export, the host path resolved, an existing directory
/// under a configured root, owned by a job's (never root's) uid and gid.
fn check_export(handler: &GatewayHandler, spec: &proto::VmSpec, path: &Path, uid: u32, gid: u32) {
    assert_eq!(
        spec.exports.len(),
        1,
        "served {} exports",
        spec.exports.len()
    );
    let host_path = &spec.exports[0].host_path;
    assert!(
        Path::new(host_path).is_absolute(),
        "relative host path {host_path:?} served"
    );
    assert!(path.is_absolute(), "export path {path:?} is relative");
    assert!(
        path.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "export path {path:?} keeps a . or .."
    );
    assert_eq!(
        std::fs::canonicalize(host_path).ok().as_deref(),
        Some(path),
        "the export is not where host path {host_path:?} leads"
    );
    assert!(path.is_dir(), "export {path:?} is not a directory");
    assert!(
        resolved_roots(handler).iter().any(|r| path.starts_with(r)),
        "export {path:?} is outside the export roots {:?}",
        handler.export_roots
    );
    let owner = spec.owner.as_ref();
    assert_eq!(owner.map(|o| (o.uid, o.gid)), Some((uid, gid)), "owner");
    assert!(
        uid != 0 && handler.job_uids.contains(uid),
        "uid {uid} served, job uids {}",
        handler.job_uids
    );
    assert!(
        gid != 0 && handler.job_gids.contains(gid),
        "gid {gid} served, job gids {}",
        handler.job_gids
    );
}

/// True when `path` has a character [`check_path`] must refuse.
fn uncarriable(path: &str) -> bool {
    path.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\')
}

/// A refusal names a rule the input breaks.
fn check_refusal(
    handler: &GatewayHandler,
    spec: &proto::VmSpec,
    net: &proto::NetworkReady,
    rule: &str,
) {
    let host_path = spec.exports.first().map_or("", |e| e.host_path.as_str());
    let real = std::fs::canonicalize(host_path);
    let nfs = spec.storage_mode == proto::StorageMode::Nfs as i32;
    let broken = match rule {
        "exports.count" => spec.exports.len() > 1,
        "owner.required" => spec.owner.is_none(),
        "owner.job_uids" => spec
            .owner
            .as_ref()
            .is_some_and(|o| !handler.job_uids.contains(o.uid)),
        "owner.job_gids" => spec
            .owner
            .as_ref()
            .is_some_and(|o| !handler.job_gids.contains(o.gid)),
        "exports.absolute" => !Path::new(host_path).is_absolute(),
        "exports.directory" => !Path::new(host_path).is_dir(),
        "exports.roots" => {
            real.is_ok_and(|p| !resolved_roots(handler).iter().any(|r| p.starts_with(r)))
        }
        "storage.nfs_user_mode" => nfs && net.mode == proto::NetworkMode::User as i32,
        "exports.path_chars" => nfs && real.is_ok_and(|p| p.to_str().is_none_or(uncarriable)),
        "storage.nfs_vm_id" => nfs && !is_name(&spec.vm_id),
        "storage.nfs" => nfs && handler.nfs.is_none(),
        other => panic!("refused by rule {other:?}, which the fuzz target does not know"),
    };
    assert!(
        broken,
        "refused by {rule} but the input does not break it: {spec:?} {net:?}"
    );
}

/// What the gateway hands the NFS server for `e`, and reads back from it, carries `e` and
/// nothing more.
fn check_rendered(e: &NfsExport, pseudo_root: &str, ids: IdRange) {
    let path = e.path.to_str().unwrap_or_default();
    assert!(
        !path.is_empty() && !uncarriable(path),
        "export path {path:?}"
    );

    // ganesha: the EXPORT block keeps the template's shape.
    let pseudo = ganesha::pseudo_path(pseudo_root, &e.vm_id);
    let name = pseudo
        .strip_prefix(pseudo_root)
        .and_then(|n| n.strip_prefix('/'))
        .unwrap_or_default();
    assert!(
        is_name(name),
        "pseudo path {pseudo:?}: the VM id {:?} is not one name of [A-Za-z0-9._-]",
        e.vm_id
    );
    let reference = export_block(
        &NfsExport {
            path: "/srv/export".into(),
            vm_id: "vm-000000000000".into(),
            ..e.clone()
        },
        "/wnodes/vm-000000000000",
    );
    let block = export_block(e, &pseudo);
    assert_eq!(
        skeleton(&block),
        skeleton(&reference),
        "EXPORT block\n{block}"
    );
    for line in [
        format!("\tExport_Id = {};", e.id),
        format!("\tPath = \"{path}\";"),
        format!("\tPseudo = \"{pseudo}\";"),
        format!("\tAnonymous_Uid = {};", e.uid),
        format!("\tAnonymous_Gid = {};", e.gid),
        format!(
            "\tCLIENT {{ Clients = {}; Access_Type = {}; }}",
            e.client,
            if e.read_only { "RO" } else { "RW" }
        ),
    ] {
        assert!(
            block.lines().any(|l| l == line),
            "{line:?} missing in\n{block}"
        );
    }

    // exportfs: one client, squashed to the owner.
    let args = Exportfs::add_args(e);
    assert_eq!(args.len(), 4, "{args:?}");
    assert_eq!(args[3], format!("{}:{path}", e.client));
    let opts: Vec<&str> = args[2].split(',').collect();
    for want in [
        format!("anonuid={}", e.uid),
        format!("anongid={}", e.gid),
        format!("fsid={}", e.id),
        "all_squash".to_owned(),
        if e.read_only { "ro" } else { "rw" }.to_owned(),
    ] {
        assert!(opts.contains(&want.as_str()), "{want} missing in {args:?}");
    }
    assert!(
        !opts.contains(&if e.read_only { "rw" } else { "ro" }),
        "{args:?}"
    );

    // exportfs -v prints `%-14s\t` then the client, or the path alone on its line when longer.
    let options = format!(
        "sync,wdelay,hide,no_subtree_check,fsid={},anonuid={},anongid={},sec=sys,{},root_squash,all_squash",
        e.id,
        e.uid,
        e.gid,
        if e.read_only { "ro" } else { "rw" }
    );
    let listed = if path.len() > 14 {
        format!("{path}\n\t\t{}({options})\n", e.client)
    } else {
        format!(
            "{path}{}\t{}({options})\n",
            " ".repeat(14 - path.len()),
            e.client
        )
    };
    let parsed = parse_exportfs_v(&listed);
    assert_eq!(parsed.len(), 1, "{listed:?} → {parsed:?}");
    assert_eq!(parsed[0].path, path, "{listed:?}");
    assert_eq!(parsed[0].client, e.client.to_string(), "{listed:?}");
    assert_eq!(parsed[0].option("fsid"), Some(e.id.to_string().as_str()));
    let present = exportfs::present(&listed, ids);
    assert_eq!(
        present.len(),
        usize::from(ids.contains(u32::from(e.id))),
        "{present:?}"
    );

    // ganesha's ShowExports and DisplayExport, as dbus-send --print-reply prints them.
    let show = format!(
        "method return time=1 sender=:1.1 -> destination=:1.4 serial=46 reply_serial=2\n   struct {{\n      uint64 1\n      uint64 2\n   }}\n   array [\n      struct {{\n         uint16 0\n         string \"/\"\n         struct {{\n            struct {{\n               string \"NFSv40\"\n               boolean false\n            }}\n         }}\n      }}\n      struct {{\n         uint16 {}\n         string \"{path}\"\n         struct {{\n            struct {{\n               string \"NFSv40\"\n               boolean true\n            }}\n         }}\n      }}\n   ]\n",
        e.id
    );
    assert_eq!(
        parse_show_exports(&show),
        [(0, "/".to_owned()), (e.id, path.to_owned())],
        "{show}"
    );
    let present = ganesha::present(&show, ids);
    assert!(
        present.iter().all(|p| ids.contains(u32::from(p.id))),
        "{present:?}"
    );
    assert_eq!(
        present.iter().any(|p| p.id == e.id && p.path == e.path),
        ids.contains(u32::from(e.id)),
        "{present:?}"
    );
    let client = format!("{}/{}", e.client, if e.client.is_ipv4() { 32 } else { 128 });
    let display = format!(
        "method return time=1 sender=:1.0 -> destination=:1.2 serial=8 reply_serial=2\n   uint16 {}\n   string \"{path}\"\n   string \"{pseudo}\"\n   string \"\"\n   array [\n      struct {{\n         string \"{client}\"\n         int32 0\n         uint32 0\n      }}\n   ]\n",
        e.id
    );
    assert_eq!(parse_display_clients(&display), [client], "{display}");
}

/// A configuration text as ganesha's parser sees its structure: how many lines, and the
/// non-comment lines with every quoted string emptied.
fn skeleton(text: &str) -> (usize, String) {
    let mut out = String::new();
    let mut quoted = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        for c in line.chars() {
            if c == '"' {
                quoted = !quoted;
                out.push(c);
            } else if !quoted {
                out.push(c);
            }
        }
        out.push('\n');
    }
    (text.lines().count(), out)
}

/// One name of `[A-Za-z0-9._-]`, not `.` or `..` (what `[gateway.nfs.ganesha] pseudo_root`'s
/// parts must be).
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

// ---------------------------------------------------------------------------------------------
// config

/// The fields of a `config` input, one a line: `port_range`, `job_uids`, `job_gids`,
/// `export_roots` (comma-separated, `~` the tree), `nfs.export_ids` (empty: no `[gateway.nfs]`),
/// `nfs.port` (a number; else 2049), `nfs.ganesha.pseudo_root` (empty: the default).
fn config(fields: &[&str]) -> Verdict {
    let f = |i| field(fields, i);
    let tree = tree();
    let here = |s: &str| tree.map_or_else(|| s.to_owned(), |t| in_tree(t, s));
    let nfs = (!f(4).is_empty()).then(|| {
        let mut n = NfsConfig {
            export_ids: f(4).into(),
            port: f(5).trim().parse().unwrap_or(2049),
            ..Default::default()
        };
        if !f(6).is_empty() {
            n.ganesha.pseudo_root = f(6).into();
        }
        n
    });
    let cfg = GatewayConfig {
        port_range: f(0).into(),
        job_uids: f(1).into(),
        job_gids: f(2).into(),
        export_roots: f(3)
            .split(',')
            .filter(|r| !r.is_empty())
            .map(|r| PathBuf::from(here(r)))
            .collect(),
        nfs,
        ..Default::default()
    };
    // Each range alone.
    for s in [f(0), f(1), f(2), f(4)] {
        if let Ok(r) = s.parse::<IdRange>() {
            check_ids(r, s);
        }
        if let Ok(r) = s.parse::<PortRange>() {
            assert!(
                r.first >= 1 && r.first <= r.last,
                "port range {s:?} → {r:?}"
            );
            let back: Option<PortRange> = format!("{}-{}", r.first, r.last).parse().ok();
            assert_eq!(back, Some(r), "port range {s:?}");
        }
    }
    if cfg.validate().is_err() {
        return Verdict::Invalid;
    }
    let ports = cfg.ports();
    assert!(
        ports.is_ok(),
        "port_range {:?} passed validate",
        cfg.port_range
    );
    let ids = cfg.id_ranges();
    assert!(
        ids.is_ok(),
        "job ids {:?} passed validate",
        (&cfg.job_uids, &cfg.job_gids)
    );
    if let Ok((u, g)) = ids {
        check_ids(u, &cfg.job_uids);
        check_ids(g, &cfg.job_gids);
    }
    for root in &cfg.export_roots {
        assert!(root.is_absolute(), "export root {root:?} is relative");
        if let Ok(real) = std::fs::canonicalize(root) {
            assert!(
                real.parent().is_some(),
                "export root {root:?} resolves to {real:?}: it would export the whole host"
            );
        }
    }
    if let Some(nfs) = &cfg.nfs {
        match nfs.ids() {
            Ok(r) => {
                check_ids(r, &nfs.export_ids);
                assert!(r.last <= u32::from(u16::MAX), "export ids {r}");
            }
            Err(e) => panic!("export_ids {:?} passed validate: {e}", nfs.export_ids),
        }
        assert_ne!(nfs.port, 0, "NFS port 0");
        let root = &nfs.ganesha.pseudo_root;
        let parts = root.strip_prefix('/').map(|r| r.split('/').all(is_name));
        assert_eq!(parts, Some(true), "pseudo_root {root:?}");
    }
    Verdict::Accepted
}

/// An id range as parsed from `s`: never 0, `first <= last`, and it prints back as it parsed.
fn check_ids(r: IdRange, s: &str) {
    assert!(
        r.first >= 1 && r.first <= r.last && !r.contains(0),
        "id range {s:?} → {r:?}"
    );
    assert_eq!(r.to_string().parse::<IdRange>(), Ok(r), "id range {s:?}");
}

// ---------------------------------------------------------------------------------------------
// path

/// One path through [`check_path`]; an accepted absolute path through the renderings.
fn path(p: &str) -> Verdict {
    let ok = check_path(Path::new(p)).is_ok();
    assert_eq!(ok, !uncarriable(p), "check_path({p:?})");
    if !ok {
        return Verdict::Invalid;
    }
    if p.starts_with('/') {
        let e = NfsExport {
            id: 101,
            vm_id: "vm-0123456789ab".into(),
            path: p.into(),
            client: IpAddr::V4(Ipv4Addr::new(10, 231, 1, 2)),
            uid: 1000,
            gid: 1000,
            read_only: false,
        };
        check_rendered(&e, "/wnodes", DEFAULT_IDS);
    }
    Verdict::Accepted
}

// ---------------------------------------------------------------------------------------------
// parsers

/// `exportfs -v` output: entries have a path and a client that were in the text, options
/// without commas, an fsid in `ids`.
fn exportfs_text(text: &str, ids: IdRange) -> usize {
    let entries = parse_exportfs_v(text);
    let lines = text.lines().filter(|l| l.contains('(')).count();
    assert!(
        entries.len() <= lines,
        "{} entries of {lines} lines",
        entries.len()
    );
    for e in &entries {
        assert!(
            !e.path.is_empty() && e.path.trim() == e.path && !e.path.contains('\n'),
            "path {:?}",
            e.path
        );
        assert!(
            text.contains(&e.path),
            "path {:?} is not in the text",
            e.path
        );
        assert!(
            !e.client.is_empty() && !e.client.contains([' ', '\t', '(', '\n']),
            "client {:?}",
            e.client
        );
        assert!(
            text.contains(&format!("{}(", e.client)),
            "client {:?}",
            e.client
        );
        assert!(
            e.options.iter().all(|o| !o.is_empty() && !o.contains(',')),
            "options {:?}",
            e.options
        );
    }
    let present = exportfs::present(text, ids);
    for p in &present {
        assert!(ids.contains(u32::from(p.id)), "fsid {} outside {ids}", p.id);
        assert!(
            entries.iter().any(|e| e.path == p.path.to_string_lossy()
                && Some(&e.client) == p.client.as_ref()
                && e.option("fsid").and_then(|f| f.parse().ok()) == Some(p.id)),
            "{p:?} is no entry of the text"
        );
    }
    entries.len()
}

/// ganesha's `ShowExports` and `DisplayExport` replies: ids and strings that were in the text,
/// ids in `ids`.
fn ganesha_text(text: &str, ids: IdRange) -> usize {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let exports = parse_show_exports(text);
    let id_lines: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("uint16 "))
        .collect();
    assert!(exports.len() <= id_lines.len(), "{exports:?}");
    for (id, path) in &exports {
        assert!(
            lines.contains(&format!("string \"{path}\"").as_str()),
            "path {path:?} is not a string of the text"
        );
        assert!(
            id_lines.iter().any(|l| l.contains(&id.to_string())),
            "id {id} is not in the text"
        );
    }
    for p in ganesha::present(text, ids) {
        assert!(ids.contains(u32::from(p.id)), "id {} outside {ids}", p.id);
        assert!(
            exports
                .iter()
                .any(|(id, path)| *id == p.id && p.path == Path::new(path)),
            "{p:?}"
        );
    }
    let clients = parse_display_clients(text);
    let structs = lines.iter().filter(|l| **l == "struct {").count();
    assert!(clients.len() <= structs, "{clients:?}");
    for c in &clients {
        assert!(
            lines.contains(&format!("string \"{c}\"").as_str()),
            "client {c:?} is not a string of the text"
        );
    }
    exports.len() + clients.len()
}

/// `/proc/net/tcp{,6}`: the uid found is a uid column of the text; after a line the kernel
/// writes for the two sockets the lookup always finds one (the text's own match first).
/// `head`: `SOCKET REMOTE [6]` (`6`: the line as `tcp6` writes an IPv4 socket).
fn tcp_text(head: &str, text: &str) -> usize {
    let mut words = head.split_whitespace();
    let mut addr = |default: SocketAddr| {
        words
            .next()
            .and_then(|w| w.parse::<SocketAddr>().ok())
            .map_or(default, |a| {
                SocketAddr::new(a.ip().to_canonical(), a.port())
            })
    };
    let sock = addr(SocketAddr::from(([127, 0, 0, 1], 45678)));
    let remote = addr(SocketAddr::from(([127, 0, 0, 1], 20001)));
    let six = words.next() == Some("6");
    let found = find_socket_uid(text, sock, remote);
    if let Some(uid) = found {
        assert!(
            text.lines()
                .skip(1)
                .any(|l| { l.split_whitespace().nth(7).and_then(|c| c.parse().ok()) == Some(uid) }),
            "uid {uid} is no uid column of the text"
        );
    }
    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
    let body = format!("{HEADER}\n{text}\n");
    let kernel = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) if !six => {
            format!("{:08X}:{:04X}", u32::from_le_bytes(v4.octets()), a.port())
        }
        ip => {
            let v6 = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let words: String = v6
                .octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            format!("{words}:{:04X}", a.port())
        }
    };
    let line = format!(
        "   9: {} {} 01 00000000:00000000 00:00000000 00000000  4242        0 4012 1 0000000000000000 20 4 30 10 -1\n",
        kernel(sock),
        kernel(remote)
    );
    let before = find_socket_uid(&body, sock, remote);
    let after = find_socket_uid(&format!("{body}{line}"), sock, remote);
    assert_eq!(
        after,
        Some(before.unwrap_or(4242)),
        "the kernel's line {line:?} for {sock} → {remote}"
    );
    usize::from(found.is_some())
}

/// `ldd` output: absolute paths without whitespace that were in the text, at least one.
fn ldd_text(text: &str) -> usize {
    let Ok(libs) = parse_ldd(text) else {
        return 0;
    };
    assert!(!libs.is_empty(), "ldd: no library, no error");
    for l in &libs {
        let s = l.to_string_lossy();
        assert!(
            s.starts_with('/') && !s.contains(char::is_whitespace) && text.contains(s.as_ref()),
            "library {s:?}"
        );
    }
    libs.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "is not one name")]
    fn a_vm_id_that_breaks_the_pseudo_path_is_caught() {
        let e = NfsExport {
            id: 101,
            vm_id: "vm-1\";\n\tSquash = None;".into(),
            path: "/srv/a".into(),
            client: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            uid: 1000,
            gid: 1000,
            read_only: false,
        };
        check_rendered(&e, "/wnodes", DEFAULT_IDS);
    }

    #[test]
    fn the_tree_has_its_links() {
        let tree = tree().unwrap();
        assert_eq!(
            std::fs::canonicalize(tree.join("exports/alice/out")).unwrap(),
            tree.join("outside")
        );
        assert_eq!(
            std::fs::canonicalize(tree.join("rootlink")).unwrap(),
            Path::new("/")
        );
        assert!(tree.join("exports/tab\tdir").is_dir());
    }
}
