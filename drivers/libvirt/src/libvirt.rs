//! The libvirt calls the driver makes, through the `virt` crate. libvirt's client library
//! blocks, so every call runs on tokio's blocking pool: the core's single-threaded runtime keeps
//! reading signals and stage output meanwhile.

use std::sync::Arc;

use drover_core::{Error, Result};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

/// The namespace of drover's `<metadata>` element in a domain's XML.
pub const METADATA_NS: &str = "https://drover.dev/libvirt/1";

/// A connection to libvirt.
#[derive(Clone)]
pub struct Libvirt {
    conn: Arc<Connection>,
    /// The connection URI, for messages.
    pub uri: String,
}

/// Closes the connection on drop without the panic `virt` raises when a close fails (a daemon
/// that went away): a driver that lost libvirt reports that from the call that noticed.
struct Connection(Option<Connect>);

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(mut conn) = self.0.take() {
            let _ = conn.close();
        }
    }
}

/// A domain drover made, as `gc` sees it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its name.
    pub name: String,
    /// Its drover labels (`<drover:labels>` attributes).
    pub labels: std::collections::BTreeMap<String, String>,
}

fn failed(what: &str, err: &virt::error::Error) -> Error {
    Error::system(format!("{what}: {}", err.message()))
}

/// Whether `err` says the domain, volume or pool does not exist.
fn is_missing(err: &virt::error::Error) -> bool {
    matches!(
        err.code(),
        virt::error::ErrorNumber::NoDomain
            | virt::error::ErrorNumber::NoStorageVolume
            | virt::error::ErrorNumber::NoStoragePool
    )
}

impl Libvirt {
    /// Opens `uri` (`qemu:///system`, `qemu:///session`, ...).
    pub async fn connect(uri: &str) -> Result<Libvirt> {
        let owned = uri.to_owned();
        // libvirt prints every error on stderr by default; the driver reports its own.
        virt::error::clear_error_callback();
        let conn = blocking(move || {
            Connect::open(Some(&owned)).map_err(|err| {
                Error::system(format!(
                    "cannot connect to libvirt at {owned}: {} (is libvirtd running? `virsh -c {owned} version` tells)",
                    err.message()
                ))
            })
        })
        .await?;
        Ok(Libvirt {
            conn: Arc::new(Connection(Some(conn))),
            uri: uri.to_owned(),
        })
    }

    fn conn(&self) -> &Connect {
        self.conn.0.as_ref().expect("open until dropped")
    }

    /// Runs `call` with the connection on the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Connect) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        blocking(move || call(this.conn())).await
    }

    /// `libvirt X, QEMU Y`.
    pub async fn describe(&self) -> Result<String> {
        self.call(|conn| {
            let lib = conn
                .get_lib_version()
                .map_err(|e| failed("libvirt version", &e))?;
            let hypervisor = conn
                .get_hyp_version()
                .map_err(|e| failed("hypervisor version", &e))?;
            Ok(format!(
                "libvirt {}, QEMU {}",
                version(lib),
                version(hypervisor)
            ))
        })
        .await
    }

    /// Whether libvirt offers domain type `kvm` at all (its capabilities); the driver still
    /// tries it before it trusts it (see `probe`).
    pub async fn lists_kvm(&self) -> Result<bool> {
        self.call(|conn| {
            let caps = conn
                .get_capabilities()
                .map_err(|e| failed("capabilities", &e))?;
            Ok(caps.contains("<domain type='kvm'"))
        })
        .await
    }

    /// Defines a persistent domain from `xml` and starts it; returns its live XML (which names
    /// what libvirt chose, such as the channel sockets).
    pub async fn define_and_start(&self, xml: String) -> Result<String> {
        self.call(move |conn| {
            let domain = Domain::define_xml(conn, &xml)
                .map_err(|e| failed("cannot define the domain", &e))?;
            domain
                .create()
                .map_err(|e| failed("cannot start the domain", &e))?;
            domain
                .get_xml_desc(0)
                .map_err(|e| failed("cannot read the started domain", &e))
        })
        .await
    }

    /// Starts a transient domain from `xml` (it is gone once it stops).
    pub async fn create_transient(&self, xml: String) -> Result<()> {
        self.call(move |conn| {
            Domain::create_xml(conn, &xml, 0)
                .map(|_| ())
                .map_err(|e| failed("cannot start the domain", &e))
        })
        .await
    }

    /// Whether domain `name` exists and runs; `None` when there is no such domain.
    pub async fn running(&self, name: &str) -> Result<Option<bool>> {
        let name = name.to_owned();
        self.call(move |conn| match Domain::lookup_by_name(conn, &name) {
            Ok(domain) => domain
                .is_active()
                .map(Some)
                .map_err(|e| failed(&format!("domain {name}"), &e)),
            Err(err) if is_missing(&err) => Ok(None),
            Err(err) => Err(failed(&format!("domain {name}"), &err)),
        })
        .await
    }

    /// Stops domain `name` at once and removes its definition, NVRAM and saved state included.
    /// Succeeds when there is no such domain.
    pub async fn remove_domain(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        self.call(move |conn| {
            let domain = match Domain::lookup_by_name(conn, &name) {
                Ok(domain) => domain,
                Err(err) if is_missing(&err) => return Ok(false),
                Err(err) => return Err(failed(&format!("domain {name}"), &err)),
            };
            if domain.is_active().unwrap_or(true) {
                if let Err(err) = domain.destroy() {
                    // It may have stopped between the two calls.
                    if domain.is_active().unwrap_or(true) {
                        return Err(failed(&format!("cannot stop domain {name}"), &err));
                    }
                }
            }
            let flags = sys::VIR_DOMAIN_UNDEFINE_NVRAM
                | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA;
            match domain.undefine_flags(flags) {
                Ok(()) => Ok(true),
                // A transient domain is gone once destroyed.
                Err(err)
                    if is_missing(&err)
                        || err.code() == virt::error::ErrorNumber::OperationInvalid =>
                {
                    Ok(true)
                }
                Err(err) => Err(failed(&format!("cannot undefine domain {name}"), &err)),
            }
        })
        .await
    }

    /// Replaces drover's labels of domain `name`, in the running domain and its definition.
    pub async fn set_labels(
        &self,
        name: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let element = crate::domain::labels_element(labels, false);
        self.on_domain(name, "cannot label domain", move |domain| {
            domain.set_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(&element),
                Some("drover"),
                Some(METADATA_NS),
                sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG,
            )
        })
        .await
    }

    /// Plugs the device of `xml` into running domain `name` (and its definition, so undefining
    /// the domain forgets it too).
    pub async fn attach(&self, name: &str, xml: String) -> Result<()> {
        self.on_domain(name, "cannot plug a disk into domain", move |domain| {
            domain.attach_device_flags(
                &xml,
                sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG,
            )
        })
        .await
    }

    /// Runs `change` on domain `name`; a failure is `<what> <name>: <libvirt's message>`.
    async fn on_domain(
        &self,
        name: &str,
        what: &'static str,
        change: impl FnOnce(&Domain) -> std::result::Result<u32, virt::error::Error> + Send + 'static,
    ) -> Result<()> {
        let name = name.to_owned();
        self.call(move |conn| {
            let domain = Domain::lookup_by_name(conn, &name)
                .map_err(|e| failed(&format!("domain {name}"), &e))?;
            change(&domain)
                .map(|_| ())
                .map_err(|e| failed(&format!("{what} {name}"), &e))
        })
        .await
    }

    /// Every domain with drover labels, running or not.
    pub async fn drover_domains(&self) -> Result<Vec<Listed>> {
        self.call(|conn| {
            let domains = conn
                .list_all_domains(0)
                .map_err(|e| failed("cannot list domains", &e))?;
            let mut listed = Vec::new();
            for domain in domains {
                // Not drover's when it has no metadata element of drover's namespace.
                let Ok(metadata) = domain.get_metadata(
                    sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                    Some(METADATA_NS),
                    0,
                ) else {
                    continue;
                };
                let labels = crate::domain::labels_of(&metadata);
                let Ok(name) = domain.get_name() else {
                    continue;
                };
                if labels.is_empty() {
                    continue;
                }
                listed.push(Listed { name, labels });
            }
            Ok(listed)
        })
        .await
    }

    /// The storage pool `pool`, made (a directory pool at `dir`) and started when missing.
    /// Returns its target directory.
    pub async fn ensure_pool(&self, pool: &str, dir: &std::path::Path) -> Result<String> {
        let (pool, dir) = (pool.to_owned(), dir.to_owned());
        self.call(move |conn| {
            let found = match StoragePool::lookup_by_name(conn, &pool) {
                Ok(found) => found,
                Err(err) if is_missing(&err) => {
                    std::fs::create_dir_all(&dir).map_err(|e| {
                        Error::system(format!("cannot create {}: {e}", dir.display()))
                    })?;
                    let xml = format!(
                        "<pool type='dir'><name>{}</name><target><path>{}</path></target></pool>",
                        crate::domain::escape(&pool),
                        crate::domain::escape(&dir.display().to_string())
                    );
                    StoragePool::define_xml(conn, &xml, 0)
                        .map_err(|e| failed(&format!("cannot define storage pool {pool}"), &e))?
                }
                Err(err) => return Err(failed(&format!("storage pool {pool}"), &err)),
            };
            if !found.is_active().unwrap_or(false) {
                found
                    .create(0)
                    .map_err(|e| failed(&format!("cannot start storage pool {pool}"), &e))?;
                let _ = found.set_autostart(true);
            }
            target_path(&found, &pool)
        })
        .await
    }

    /// The target directory of storage pool `pool` if it exists and runs, without making or
    /// starting it (for gc and doctor, which change nothing they do not remove).
    pub async fn pool_path(&self, pool: &str) -> Result<Option<String>> {
        let pool = pool.to_owned();
        self.call(move |conn| match StoragePool::lookup_by_name(conn, &pool) {
            Ok(found) if found.is_active().unwrap_or(false) => target_path(&found, &pool).map(Some),
            Ok(_) => Ok(None),
            Err(err) if is_missing(&err) => Ok(None),
            Err(err) => Err(failed(&format!("storage pool {pool}"), &err)),
        })
        .await
    }

    /// Makes volume `name` in `pool` from `xml` unless it exists; returns its path.
    pub async fn ensure_volume(&self, pool: &str, name: &str, xml: String) -> Result<String> {
        let (pool, name) = (pool.to_owned(), name.to_owned());
        self.call(move |conn| {
            let found = StoragePool::lookup_by_name(conn, &pool)
                .map_err(|e| failed(&format!("storage pool {pool}"), &e))?;
            let volume = match StorageVol::lookup_by_name(&found, &name) {
                Ok(volume) => volume,
                Err(err) if is_missing(&err) => StorageVol::create_xml(&found, &xml, 0)
                    .map_err(|e| failed(&format!("cannot create volume {name}"), &e))?,
                Err(err) => return Err(failed(&format!("volume {name}"), &err)),
            };
            volume
                .get_path()
                .map_err(|e| failed(&format!("volume {name}"), &e))
        })
        .await
    }

    /// Deletes volume `name` of `pool`; succeeds when there is none.
    pub async fn delete_volume(&self, pool: &str, name: &str) -> Result<bool> {
        let (pool, name) = (pool.to_owned(), name.to_owned());
        self.call(move |conn| {
            let found = match StoragePool::lookup_by_name(conn, &pool) {
                Ok(found) => found,
                Err(err) if is_missing(&err) => return Ok(false),
                Err(err) => return Err(failed(&format!("storage pool {pool}"), &err)),
            };
            // Files made or removed behind libvirt's back (a crashed driver) must be seen.
            let _ = found.refresh(0);
            match StorageVol::lookup_by_name(&found, &name) {
                Ok(volume) => volume
                    .delete(0)
                    .map(|()| true)
                    .map_err(|e| failed(&format!("cannot delete volume {name}"), &e)),
                Err(err) if is_missing(&err) => Ok(false),
                Err(err) => Err(failed(&format!("volume {name}"), &err)),
            }
        })
        .await
    }

    /// The names of the volumes of `pool`.
    pub async fn volumes(&self, pool: &str) -> Result<Vec<String>> {
        let pool = pool.to_owned();
        self.call(move |conn| {
            let found = match StoragePool::lookup_by_name(conn, &pool) {
                Ok(found) => found,
                Err(err) if is_missing(&err) => return Ok(Vec::new()),
                Err(err) => return Err(failed(&format!("storage pool {pool}"), &err)),
            };
            let _ = found.refresh(0);
            found
                .list_volumes()
                .map_err(|e| failed(&format!("storage pool {pool}"), &e))
        })
        .await
    }
}

/// The target directory of storage pool `found` (named `name`).
fn target_path(found: &StoragePool, name: &str) -> Result<String> {
    let xml = found
        .get_xml_desc(0)
        .map_err(|e| failed(&format!("storage pool {name}"), &e))?;
    crate::domain::element_text(&xml, "path")
        .ok_or_else(|| Error::system(format!("storage pool {name} has no target path")))
}

/// `9000000` → `9.0.0`.
fn version(number: u32) -> String {
    format!(
        "{}.{}.{}",
        number / 1_000_000,
        number / 1000 % 1000,
        number % 1000
    )
}

async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|err| Error::system(format!("a libvirt call failed: {err}")))?
}
