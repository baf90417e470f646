//! The file lists scans keep, as DataFusion's list-files cache.
//!
//! A [`FileScan`](crate::FileScan) lists its paths once, leaving out bookkeeping files
//! (`_SUCCESS`, `.crc`, staging folders), and reads those files and no others. The
//! DataFusion file tables it plans with (relational operators and SQL go through
//! them) would list the paths again: bookkeeping files included, and files added
//! since. So each scan names its paths with a table reference of its own and keeps
//! its list here under it; a table over those paths finds the list instead of
//! listing. Any other listing goes to the store every time: nothing else is kept, so
//! a folder written again is read as it is now (DataFusion's own cache keeps every
//! listing for the session's life, never invalidated).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use datafusion::common::TableReference;
use datafusion::execution::cache::cache_manager::CachedFileList;
use datafusion::execution::cache::{Cache, CacheEntryInfo, CacheValue, TableScopedPath};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use object_store::ObjectMeta;

/// The lists of every scan alive in this process (table references are unique).
static KEPT: LazyLock<Arc<ScanListings>> = LazyLock::new(Arc::default);

/// `builder` with the scans' lists as its list-files cache.
pub fn with_scan_listings(builder: RuntimeEnvBuilder) -> RuntimeEnvBuilder {
    let cache: Arc<dyn Cache<TableScopedPath, CachedFileList>> = Arc::clone(&KEPT) as _;
    builder.with_cache_manager(
        datafusion::execution::cache::cache_manager::CacheManagerConfig::default()
            .with_list_files_cache(Some(cache)),
    )
}

/// The list-files cache that holds only what scans keep ([`KeptListing`]).
#[derive(Debug, Default)]
pub struct ScanListings {
    lists: Mutex<HashMap<TableScopedPath, CachedFileList>>,
}

impl ScanListings {
    fn lists(&self) -> std::sync::MutexGuard<'_, HashMap<TableScopedPath, CachedFileList>> {
        self.lists.lock().expect("scan listings lock")
    }
}

/// The lists one scan keeps, under its own table reference; they go when it goes.
#[derive(Debug)]
pub(crate) struct KeptListing {
    table: TableReference,
}

impl KeptListing {
    /// A table reference no other scan uses.
    pub(crate) fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            table: TableReference::bare(format!("volley_scan_{id}")),
        }
    }

    /// The table reference the scan's paths carry.
    pub(crate) fn table(&self) -> &TableReference {
        &self.table
    }

    /// Keeps `files` as the listing of the path `prefix` of this scan's table.
    pub(crate) fn keep(&self, prefix: &object_store::path::Path, files: Vec<ObjectMeta>) {
        let key = TableScopedPath {
            table: Some(self.table.clone()),
            path: prefix.clone(),
        };
        KEPT.lists().insert(key, CachedFileList::new(files));
    }
}

impl Drop for KeptListing {
    fn drop(&mut self) {
        KEPT.lists()
            .retain(|k, _| k.table.as_ref() != Some(&self.table));
    }
}

impl Cache<TableScopedPath, CachedFileList> for ScanListings {
    fn get(&self, key: &TableScopedPath) -> Option<CachedFileList> {
        self.lists().get(key).cloned()
    }

    /// Keeps nothing: a listing DataFusion made is not reused (see the module's doc).
    fn put(&self, _key: &TableScopedPath, _value: CachedFileList) -> Option<CachedFileList> {
        None
    }

    fn remove(&self, key: &TableScopedPath) -> Option<CachedFileList> {
        self.lists().remove(key)
    }

    fn contains_key(&self, key: &TableScopedPath) -> bool {
        self.lists().contains_key(key)
    }

    fn len(&self) -> usize {
        self.lists().len()
    }

    /// Leaves the scans' lists: they go with their scans.
    fn clear(&self) {}

    fn name(&self) -> String {
        "volley scan listings".to_string()
    }

    /// Unbounded: one list per path of each scan alive.
    fn cache_limit(&self) -> usize {
        usize::MAX
    }

    fn update_cache_limit(&self, _limit: usize) {}

    fn cache_ttl(&self) -> Option<Duration> {
        None
    }

    fn update_cache_ttl(&self, _ttl: Option<Duration>) {}

    fn drop_table_entries(&self, table: &TableReference) -> datafusion::common::Result<()> {
        self.lists().retain(|k, _| k.table.as_ref() != Some(table));
        Ok(())
    }

    fn list_entries(
        &self,
    ) -> datafusion::common::HashMap<TableScopedPath, CacheEntryInfo<CachedFileList>> {
        self.lists()
            .iter()
            .map(|(k, v)| {
                let info = CacheEntryInfo {
                    value: v.clone(),
                    size_bytes: v.size(),
                    hits: 0,
                    expires: None,
                };
                (k.clone(), info)
            })
            .collect()
    }
}
