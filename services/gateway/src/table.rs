//! The gateway's rows in the preparers' resource table ([`wnodes_preparer::Table`], kind
//! `storage`, in the service's key store), one per VM.
//!
//! ```text
//! pending    the spec is known (exports, owner); no listener yet
//! prepared   storage.ready was published; a listener runs on bind:port (port none: no exports)
//! released   tombstone: the port is free; a late vm.requested / network.ready is released
//! ```
//!
//! The detail ([`Storage`]) keeps the spec and the published `StorageReady` as hex-encoded
//! protobuf (the generated types have no JSON form) and the listener's address.

use prost::Message;
use serde::{Deserialize, Serialize};
use sqlx::{SqliteConnection, SqlitePool};
use wnodes_bus::proto;
use wnodes_preparer::{Kind, State, Table, TableError};

/// What the gateway keeps about a VM (the row's JSON detail).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Storage {
    /// The VM's spec, from `vm.requested`; `None` also when the stored bytes do not decode.
    #[serde(with = "proto_hex", default)]
    pub spec: Option<proto::VmSpec>,
    /// The `storage.ready` published (prepared rows).
    #[serde(with = "proto_hex", default)]
    pub ready: Option<proto::StorageReady>,
    /// Listener address (prepared, with exports).
    pub bind: Option<String>,
    /// Listener port (prepared, with exports).
    pub port: Option<u16>,
    /// The NFS export (prepared, NFS mode).
    #[serde(default)]
    pub nfs: Option<NfsHeld>,
}

/// An NFS export a VM holds: its id on the server and the directory exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NfsHeld {
    pub id: u16,
    pub path: std::path::PathBuf,
}

/// One VM's row.
pub type Row = wnodes_preparer::Row<Storage>;

/// The gateway's rows.
pub const TABLE: Table<Storage> = Table::new(Kind::Storage);

/// A protobuf message as the hex of its encoding. Bytes that do not decode read as `None`.
mod proto_hex {
    use prost::Message;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<M: Message, S: Serializer>(m: &Option<M>, s: S) -> Result<S::Ok, S::Error> {
        m.as_ref()
            .map(|m| hex::encode(m.encode_to_vec()))
            .serialize(s)
    }

    pub fn deserialize<'de, M: Message + Default, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<M>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        Ok(text
            .and_then(|t| hex::decode(t).ok())
            .and_then(|b| M::decode(b.as_slice()).ok()))
    }
}

type OldRow = (
    String,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<String>,
    Option<i64>,
    i64,
);

/// Creates the table and migrates the rows of an earlier version's `gateway_vms` (at start).
pub async fn init(pool: &SqlitePool) -> Result<(), TableError> {
    TABLE.init(pool).await?;
    TABLE
        .migrate(
            pool,
            "gateway_vms",
            "SELECT vm_id, state, spec, ready, bind, port, updated_at FROM gateway_vms",
            |(vm_id, state, spec, ready, bind, port, at): OldRow| {
                let state = match state.as_str() {
                    "requested" => State::Pending,
                    "serving" => State::Prepared,
                    "released" => State::Released,
                    _ => return None,
                };
                Some(Row {
                    kind: Kind::Storage,
                    vm_id,
                    // The old table did not keep it.
                    run_key: String::new(),
                    state,
                    detail: Storage {
                        spec: spec.and_then(|b| proto::VmSpec::decode(b.as_slice()).ok()),
                        ready: ready.and_then(|b| proto::StorageReady::decode(b.as_slice()).ok()),
                        bind,
                        port: port.and_then(|p| u16::try_from(p).ok()),
                        nfs: None,
                    },
                    created_at: at,
                    updated_at: at,
                })
            },
        )
        .await
        .map(drop)
}

/// The row of `vm_id`.
pub async fn get(conn: &mut SqliteConnection, vm_id: &str) -> Result<Option<Row>, TableError> {
    TABLE.get(conn, vm_id).await
}

/// Ports held by prepared rows other than `vm_id`'s.
pub async fn ports_in_use(
    conn: &mut SqliteConnection,
    vm_id: &str,
) -> Result<Vec<u16>, TableError> {
    Ok(TABLE
        .prepared(conn)
        .await?
        .into_iter()
        .filter(|r| r.vm_id != vm_id)
        .filter_map(|r| r.detail.port)
        .collect())
}

/// NFS export ids held by prepared rows other than `vm_id`'s.
pub async fn nfs_ids_in_use(
    conn: &mut SqliteConnection,
    vm_id: &str,
) -> Result<Vec<u16>, TableError> {
    Ok(TABLE
        .prepared(conn)
        .await?
        .into_iter()
        .filter(|r| r.vm_id != vm_id)
        .filter_map(|r| r.detail.nfs.map(|n| n.id))
        .collect())
}

/// Records the spec of a requested VM (keeps an existing row as it is).
pub async fn remember(
    conn: &mut SqliteConnection,
    run_key: &str,
    spec: &proto::VmSpec,
) -> Result<(), TableError> {
    let detail = Storage {
        spec: Some(spec.clone()),
        ..Default::default()
    };
    TABLE
        .pend(conn, &spec.vm_id, run_key, &detail)
        .await
        .map(drop)
}

/// Marks the VM of `row` prepared with the published `ready` and the listener's `bind`/`port`
/// or its NFS export (the spec stays).
pub async fn set_serving(
    conn: &mut SqliteConnection,
    row: &Row,
    ready: &proto::StorageReady,
    listener: Option<(String, u16)>,
    nfs: Option<NfsHeld>,
) -> Result<(), TableError> {
    let (bind, port) = listener.unzip();
    let detail = Storage {
        spec: row.detail.spec.clone(),
        ready: Some(ready.clone()),
        bind,
        port,
        nfs,
    };
    TABLE
        .prepare(conn, &row.vm_id, &row.run_key, &detail)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vm_id: &str) -> proto::VmSpec {
        proto::VmSpec {
            vm_id: vm_id.into(),
            exports: vec![proto::StorageExport {
                name: "data".into(),
                host_path: "/srv/data".into(),
                guest_path: "/mnt/data".into(),
                read_only: true,
            }],
            owner: Some(proto::JobOwner {
                uid: 1000,
                gid: 1000,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A store written by the previous version (its own table) is read after the upgrade.
    #[tokio::test]
    async fn rows_of_the_old_table_are_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = wnodes_bus::KeyStore::open(&dir.path().join("g.db"))
            .await
            .unwrap();
        let pool = store.pool();
        // The previous version's schema, verbatim.
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS gateway_vms (
                vm_id      TEXT PRIMARY KEY,
                state      TEXT NOT NULL,
                spec       BLOB,
                ready      BLOB,
                bind       TEXT,
                port       INTEGER,
                updated_at INTEGER NOT NULL
            )",
        )
        .execute(pool)
        .await
        .unwrap();
        let ready = proto::StorageReady {
            vm_id: "vm-s".into(),
            port: 20001,
            allowed_client: "10.231.1.2".into(),
            ..Default::default()
        };
        let old_rows = [
            (
                "vm-s",
                "serving",
                Some(spec("vm-s").encode_to_vec()),
                Some(ready.encode_to_vec()),
                Some("10.231.1.1"),
                Some(20001),
            ),
            (
                "vm-r",
                "requested",
                Some(spec("vm-r").encode_to_vec()),
                None,
                None,
                None,
            ),
            ("vm-x", "released", None, None, None, None),
        ];
        for (vm_id, state, spec, ready, bind, port) in old_rows {
            sqlx::query("INSERT INTO gateway_vms VALUES (?, ?, ?, ?, ?, ?, 9)")
                .bind(vm_id)
                .bind(state)
                .bind(spec)
                .bind(ready)
                .bind(bind)
                .bind(port)
                .execute(pool)
                .await
                .unwrap();
        }
        init(pool).await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        let s = get(&mut conn, "vm-s").await.unwrap().unwrap();
        assert_eq!(s.state, State::Prepared);
        assert_eq!(
            s.detail,
            Storage {
                spec: Some(spec("vm-s")),
                ready: Some(ready),
                bind: Some("10.231.1.1".into()),
                port: Some(20001),
                nfs: None,
            }
        );
        let r = get(&mut conn, "vm-r").await.unwrap().unwrap();
        assert_eq!(
            (r.state, r.detail.spec.clone()),
            (State::Pending, Some(spec("vm-r")))
        );
        assert!(get(&mut conn, "vm-x").await.unwrap().unwrap().is_released());
        assert_eq!(ports_in_use(&mut conn, "vm-other").await.unwrap(), [20001]);
        assert!(ports_in_use(&mut conn, "vm-s").await.unwrap().is_empty());
        // Serving the pending VM keeps its spec; its release frees its port.
        set_serving(
            &mut conn,
            &r,
            &proto::StorageReady::default(),
            Some(("127.0.0.1".into(), 20002)),
            None,
        )
        .await
        .unwrap();
        let r2 = get(&mut conn, "vm-r").await.unwrap().unwrap();
        assert_eq!(
            (r2.state, r2.detail.spec),
            (State::Prepared, Some(spec("vm-r")))
        );
        TABLE
            .release(&mut conn, "vm-s", "", &Storage::default())
            .await
            .unwrap();
        assert_eq!(ports_in_use(&mut conn, "vm-other").await.unwrap(), [20002]);
        drop(conn);
        init(pool).await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        assert_eq!(
            get(&mut conn, "vm-r").await.unwrap().unwrap().detail.port,
            Some(20002)
        );
        // An NFS export id is held like a port: by prepared rows, until their release.
        let n = get(&mut conn, "vm-r").await.unwrap().unwrap();
        let held = NfsHeld {
            id: 101,
            path: "/srv/e".into(),
        };
        set_serving(
            &mut conn,
            &n,
            &proto::StorageReady::default(),
            None,
            Some(held.clone()),
        )
        .await
        .unwrap();
        assert_eq!(nfs_ids_in_use(&mut conn, "vm-other").await.unwrap(), [101]);
        assert!(nfs_ids_in_use(&mut conn, "vm-r").await.unwrap().is_empty());
        assert_eq!(
            get(&mut conn, "vm-r").await.unwrap().unwrap().detail.nfs,
            Some(held)
        );
        TABLE
            .release(&mut conn, "vm-r", "", &Storage::default())
            .await
            .unwrap();
        assert!(
            nfs_ids_in_use(&mut conn, "vm-other")
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn undecodable_protobuf_reads_as_none() {
        let d: Storage =
            serde_json::from_str(r#"{"spec":"zz","ready":"ff00","bind":null,"port":null}"#)
                .unwrap();
        assert_eq!((d.spec, d.ready), (None, None));
        let round = Storage {
            spec: Some(spec("vm-a")),
            ..Default::default()
        };
        let back: Storage = serde_json::from_str(&serde_json::to_string(&round).unwrap()).unwrap();
        assert_eq!(back, round);
    }
}
