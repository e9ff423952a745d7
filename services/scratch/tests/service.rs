//! The scratch service through a real nats-server: its consumer runs in-process, "the
//! launcher" publishes VM events with the bus, results are read from a core subscription on
//! `wnodes.evt.>`.

use std::{path::Path, time::Duration};

use wnodes_bus::{
    Bus, KeyStore,
    proto::{self, event::Body},
};
use wnodes_runtime::{Config, start::InProcess};
use wnodes_scratch::{FileBackend, Scratch, ScratchConfig, VolumeState, state};
use wnodes_testkit::{
    NatsServer,
    bus::{EventSub, connect, subscribe},
    events::{Events, RunRefExt, run},
};

const HOST: &str = "hv1.example.org";
const MIB: u64 = 1 << 20;

struct Svc {
    _nats: NatsServer,
    bus: Bus,
    store: KeyStore,
    sub: EventSub,
    running: InProcess,
    dir: tempfile::TempDir,
    seen: Vec<proto::Event>,
}

/// An event of job `job`'s run (Slurm) from the launcher about its VM `vm-<job>`.
fn from_launcher(job: &str, body: impl wnodes_testkit::events::IntoBody) -> proto::Event {
    Events::new(HOST, "launcher@hv1.example.org").build(&run(job).lrms(proto::Lrms::Slurm), body)
}

fn vm_requested(job: &str, scratch_bytes: u64) -> proto::Event {
    from_launcher(
        job,
        wnodes_testkit::events::vm_requested(proto::VmSpec {
            vm_id: format!("vm-{job}"),
            image: "sl6".into(),
            scratch_bytes,
            ..Default::default()
        }),
    )
}

fn vm_stopped(job: &str) -> proto::Event {
    from_launcher(
        job,
        wnodes_testkit::events::vm_stopped(&format!("vm-{job}")),
    )
}

fn vm_failed(job: &str) -> proto::Event {
    from_launcher(
        job,
        wnodes_testkit::events::vm_failed(
            &format!("vm-{job}"),
            "policy",
            "cancelled before launch",
        ),
    )
}

fn config() -> ScratchConfig {
    ScratchConfig {
        max_bytes: 64 * MIB,
        default_bytes: 8 * MIB,
        ..Default::default()
    }
}

impl Svc {
    /// Starts nats-server and the service; `before` runs on the state dir before start-up.
    async fn start(
        config: ScratchConfig,
        before: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> anyhow::Result<Svc> {
        let nats = NatsServer::start().await?;
        let dir = tempfile::tempdir()?;
        before(dir.path())?;
        let bus = connect(&nats.admin(), &format!("scratch@{HOST}")).await?;
        let store = KeyStore::open(&dir.path().join("keys.db")).await?;
        let sub = subscribe(&bus, "wnodes.evt.>").await?;
        let running = InProcess::start::<Scratch>(Config::local(
            &nats.identity(&wnodes_bus::roles::SCRATCH, HOST).await?,
            HOST,
            dir.path(),
            config,
        ))
        .await
        .map_err(|code| anyhow::anyhow!("the scratch service exited with {code}"))?;
        Ok(Svc {
            _nats: nats,
            bus,
            store,
            sub,
            running,
            dir,
            seen: Vec::new(),
        })
    }

    fn volumes(&self) -> std::path::PathBuf {
        self.dir.path().join("volumes")
    }

    /// Waits for the next event (after those already seen) matching `pred`.
    async fn next(
        &mut self,
        what: &str,
        pred: impl Fn(&proto::Event) -> bool,
    ) -> anyhow::Result<proto::Event> {
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let ev = self.sub.next(Duration::from_secs(20)).await?;
                self.seen.push(ev.clone());
                if pred(&ev) {
                    return Ok(ev);
                }
            }
        })
        .await;
        match found {
            Ok(r) => r,
            Err(_) => anyhow::bail!("timed out waiting for {what}; seen: {:#?}", self.seen),
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        let code = self.running.stop().await;
        anyhow::ensure!(code == 0, "the scratch service exited with {code}");
        Ok(())
    }
}

fn is_ready(vm: &'static str) -> impl Fn(&proto::Event) -> bool {
    move |e| matches!(&e.body, Some(Body::ScratchReady(r)) if r.vm_id == vm)
}

fn is_released(vm: &'static str) -> impl Fn(&proto::Event) -> bool {
    move |e| matches!(&e.body, Some(Body::ResourceReleased(r)) if r.vm_id == vm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_idempotent_and_release_removes_the_file() {
    let mut svc = Svc::start(config(), |state| {
        // Left behind by an earlier life: no row knows it, so start-up removes it.
        std::fs::create_dir_all(state.join("volumes"))?;
        std::fs::write(state.join("volumes/vm-leaked.img"), b"old")
    })
    .await
    .unwrap();
    assert!(!svc.volumes().join("vm-leaked.img").exists());

    let req = vm_requested("a", 16 * MIB);
    svc.bus.publish(&req).await.unwrap();
    let first = svc.next("scratch.ready", is_ready("vm-a")).await.unwrap();
    let Some(Body::ScratchReady(r)) = &first.body else {
        unreachable!()
    };
    let path = svc.volumes().join("vm-a.img");
    assert_eq!(r.path, path.display().to_string());
    assert_eq!(
        (r.size_bytes, r.backend.as_str(), r.format.as_str()),
        (16 * MIB, "file", "raw")
    );
    assert_eq!(first.source, format!("scratch@{HOST}"));
    assert_eq!(first.id, "scratch.ready:T1/slurm/a/1");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * MIB);
    let created = std::fs::metadata(&path).unwrap().modified().unwrap();

    // The same request again, under another key (so the consumer does not skip it): the
    // handler finds the prepared volume and only publishes ready again, with the same id.
    let mut again = req.clone();
    again.id = format!("{}#again", req.id);
    svc.bus.publish(&again).await.unwrap();
    let second = svc
        .next("the second scratch.ready", is_ready("vm-a"))
        .await
        .unwrap();
    assert_eq!(second.id, first.id);
    assert_eq!(second.body, first.body);
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        created
    );
    let files: Vec<_> = std::fs::read_dir(svc.volumes()).unwrap().collect();
    assert_eq!(files.len(), 1, "{files:?}");

    // Another size for a prepared volume is refused; the volume in use is kept.
    let mut bigger = vm_requested("a", 32 * MIB);
    bigger.id = format!("{}#bigger", req.id);
    svc.bus.publish(&bigger).await.unwrap();
    let refused = svc
        .next("scratch.failed", |e| {
            matches!(&e.body, Some(Body::ScratchFailed(_)))
        })
        .await
        .unwrap();
    let Some(Body::ScratchFailed(f)) = &refused.body else {
        unreachable!()
    };
    assert!(f.reason.contains(&(16 * MIB).to_string()), "{}", f.reason);
    assert!(f.reason.contains(&(32 * MIB).to_string()), "{}", f.reason);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * MIB);

    svc.bus.publish(&vm_stopped("a")).await.unwrap();
    let rel = svc
        .next("resource.released", is_released("vm-a"))
        .await
        .unwrap();
    let Some(Body::ResourceReleased(r)) = &rel.body else {
        unreachable!()
    };
    assert_eq!(r.kind, proto::ResourceKind::Scratch as i32);
    assert!(r.detail.contains("vm-a.img"), "{}", r.detail);
    // The exact kind token is wnodes-bus's business (EventExt::build); the id is per run + kind.
    assert!(
        rel.id.starts_with("resource.released.") && rel.id.ends_with("scratch:T1/slurm/a/1"),
        "{}",
        rel.id
    );
    assert!(!path.exists());
    let row = state::get(svc.store.read_pool(), "vm-a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.state, VolumeState::Released);
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_request_fails_naming_both_sizes_and_zero_means_default() {
    let mut svc = Svc::start(config(), |_| Ok(())).await.unwrap();
    svc.bus
        .publish(&vm_requested("big", 65 * MIB))
        .await
        .unwrap();
    svc.bus.publish(&vm_requested("dflt", 0)).await.unwrap();
    let failed = svc
        .next("scratch.failed", |e| {
            matches!(&e.body, Some(Body::ScratchFailed(_)))
        })
        .await
        .unwrap();
    let Some(Body::ScratchFailed(f)) = &failed.body else {
        unreachable!()
    };
    assert_eq!(f.vm_id, "vm-big");
    assert!(f.reason.contains(&(65 * MIB).to_string()), "{}", f.reason);
    assert!(f.reason.contains(&(64 * MIB).to_string()), "{}", f.reason);
    assert!(!svc.volumes().join("vm-big.img").exists());
    let ready = svc
        .next("scratch.ready", is_ready("vm-dflt"))
        .await
        .unwrap();
    let Some(Body::ScratchReady(r)) = &ready.body else {
        unreachable!()
    };
    assert_eq!(r.size_bytes, 8 * MIB);
    svc.stop().await.unwrap();
}

/// Unmounts the test's tmpfs.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Sparse volumes never promise more than the file system holds: on an 80 MiB tmpfs a second
/// 48 MiB volume is refused while the first exists, and made once the first is released.
/// Needs root (it mounts the tmpfs); fails without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_free_space_cannot_back_is_refused() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a tmpfs: run it as root"
    );
    let mut mounted = None;
    let mut svc = Svc::start(config(), |state| {
        let dir = state.join("volumes");
        std::fs::create_dir_all(&dir)?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=80m", "tmpfs"])
            .arg(&dir)
            .status()?
            .success();
        if !ok {
            return Err(std::io::Error::other("mount -t tmpfs failed"));
        }
        mounted = Some(Tmpfs(dir));
        Ok(())
    })
    .await
    .unwrap();
    let tmpfs = mounted;

    svc.bus
        .publish(&vm_requested("big1", 48 * MIB))
        .await
        .unwrap();
    svc.next("scratch.ready", is_ready("vm-big1"))
        .await
        .unwrap();
    svc.bus
        .publish(&vm_requested("big2", 48 * MIB))
        .await
        .unwrap();
    let refused = svc
        .next(
            "scratch.failed",
            |e| matches!(&e.body, Some(Body::ScratchFailed(f)) if f.vm_id == "vm-big2"),
        )
        .await
        .unwrap();
    let Some(Body::ScratchFailed(f)) = &refused.body else {
        unreachable!()
    };
    assert!(
        f.reason.starts_with(&format!(
            "requested scratch of {} bytes cannot be backed: the volume directory's file system has",
            48 * MIB
        )),
        "{}",
        f.reason
    );
    assert!(!svc.volumes().join("vm-big2.img").exists());

    // The first released, the same size fits.
    svc.bus.publish(&vm_stopped("big1")).await.unwrap();
    svc.next("resource.released", is_released("vm-big1"))
        .await
        .unwrap();
    svc.bus
        .publish(&vm_requested("big3", 48 * MIB))
        .await
        .unwrap();
    svc.next("scratch.ready", is_ready("vm-big3"))
        .await
        .unwrap();
    // Unmounted before the state directory goes (with the service).
    drop(tmpfs);
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_after_release_creates_nothing_and_releases_again() {
    let mut svc = Svc::start(config(), |_| Ok(())).await.unwrap();
    svc.bus.publish(&vm_failed("late")).await.unwrap();
    let first = svc
        .next("resource.released", is_released("vm-late"))
        .await
        .unwrap();
    svc.bus.publish(&vm_requested("late", 0)).await.unwrap();
    let second = svc
        .next("the tombstone's resource.released", |e| {
            matches!(&e.body, Some(Body::ResourceReleased(r))
                if r.vm_id == "vm-late" && r.detail.contains("already released"))
        })
        .await
        .unwrap();
    assert_eq!(second.id, first.id, "released again under the same id");
    assert!(!svc.volumes().join("vm-late.img").exists());
    assert!(!svc.seen.iter().any(is_ready("vm-late")));
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn reconcile_removes_released_and_unknown_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = KeyStore::open(&dir.path().join("keys.db")).await.unwrap();
    state::init(store.pool()).await.unwrap();
    let backend = FileBackend::new(dir.path().join("volumes"), None).unwrap();
    for id in ["vm-keep", "vm-rel", "vm-leak"] {
        std::fs::write(backend.path_of(id), b"x").unwrap();
    }
    std::fs::write(backend.dir().join(".vm-half.img.partial"), b"x").unwrap();
    std::fs::write(backend.dir().join("notes.txt"), b"not ours").unwrap();
    {
        let mut conn = store.pool().acquire().await.unwrap();
        state::mark_prepared(&mut conn, "vm-keep", "k", "p", 1)
            .await
            .unwrap();
        state::mark_prepared(&mut conn, "vm-rel", "r", "p", 1)
            .await
            .unwrap();
        state::mark_released(&mut conn, "vm-rel", "r", "p")
            .await
            .unwrap();
        // A released row is never turned back into prepared.
        assert!(
            !state::mark_prepared(&mut conn, "vm-rel", "r", "p", 1)
                .await
                .unwrap()
        );
    }
    let volumes = wnodes_scratch::Volumes::File(backend.clone());
    let mut removed = wnodes_scratch::reconcile(&volumes, store.read_pool())
        .await
        .unwrap();
    removed.sort();
    assert_eq!(
        removed,
        vec![
            backend.path_of("vm-leak").display().to_string(),
            backend.path_of("vm-rel").display().to_string()
        ]
    );
    let mut left: Vec<_> = std::fs::read_dir(backend.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, vec!["notes.txt".to_owned(), "vm-keep.img".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_request_and_release_never_leak_a_volume() {
    let mut svc = Svc::start(config(), |_| Ok(())).await.unwrap();
    let jobs: Vec<String> = (0..16).map(|i| format!("r{i}")).collect();
    let mut events = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        // Half the VMs get their release published first.
        if i % 2 == 0 {
            events.push(vm_requested(job, 0));
            events.push(vm_stopped(job));
        } else {
            events.push(vm_stopped(job));
            events.push(vm_requested(job, 0));
        }
    }
    svc.bus.publish_pipelined(&events, 64).await.unwrap();
    // Every VM ends with its release, and its request answered (ready, or the tombstone's
    // release when it came second).
    let done = |seen: &[proto::Event], vm: &str| {
        let released = seen.iter().any(|e| {
            matches!(&e.body, Some(Body::ResourceReleased(r))
                if r.vm_id == vm && !r.detail.contains("already released"))
        });
        let answered = seen.iter().any(|e| match &e.body {
            Some(Body::ScratchReady(r)) => r.vm_id == vm,
            Some(Body::ResourceReleased(r)) => {
                r.vm_id == vm && r.detail.contains("already released")
            }
            _ => false,
        });
        released && answered
    };
    let vms: Vec<String> = jobs.iter().map(|j| format!("vm-{j}")).collect();
    while !vms.iter().all(|vm| done(&svc.seen, vm)) {
        svc.next("more events", |_| true).await.unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(svc.volumes())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "leaked volumes: {left:?}");
    for vm in &vms {
        let row = state::get(svc.store.read_pool(), vm)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.state, VolumeState::Released, "{vm}");
    }
    svc.stop().await.unwrap();
}
