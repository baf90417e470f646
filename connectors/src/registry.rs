//! Object stores made on first use, from the environment.

use std::sync::Arc;

use datafusion::common::DataFusionError;
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use object_store::ObjectStore;
use url::Url;

use crate::local_store::LocalStore;

/// An [`ObjectStoreRegistry`] that builds a store for `s3://`, `gs://`, `az://`
/// (`abfs://`, `azure://`) and `http(s)://` URLs the first time one is used, with
/// credentials and endpoints from the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`, as
/// each store's `from_env` reads them). `file://` and plain paths use the local
/// file system ([`LocalStore`]: its writes end where a folder takes no files).
#[derive(Debug)]
pub struct VolleyObjectStoreRegistry {
    inner: DefaultObjectStoreRegistry,
}

impl Default for VolleyObjectStoreRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl VolleyObjectStoreRegistry {
    /// A registry with the local file system registered.
    pub fn new() -> Self {
        let inner = DefaultObjectStoreRegistry::new();
        let local = Url::parse("file://").expect("a valid URL");
        inner.register_store(&local, Arc::new(LocalStore::default()));
        Self { inner }
    }

    fn build(url: &Url) -> Result<Arc<dyn ObjectStore>, DataFusionError> {
        let base = format!("{}://{}", url.scheme(), url.authority());
        let err = |e: object_store::Error| {
            DataFusionError::Execution(format!("cannot open object store {base}: {e}"))
        };
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "s3" | "s3a" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(base.replace("s3a://", "s3://"))
                    .build()
                    .map_err(err)?,
            ),
            "gs" | "gcs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(base.clone())
                    .build()
                    .map_err(err)?,
            ),
            "az" | "azure" | "abfs" | "abfss" | "adl" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(base.clone())
                    .build()
                    .map_err(err)?,
            ),
            "http" | "https" => Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_url(base.clone())
                    .build()
                    .map_err(err)?,
            ),
            other => {
                return Err(DataFusionError::Plan(format!(
                    "no object store for scheme `{other}://` (volley reads local paths, s3://, gs://, az://, http(s)://)"
                )))
            }
        };
        Ok(store)
    }
}

impl ObjectStoreRegistry for VolleyObjectStoreRegistry {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.inner.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> datafusion::common::Result<Arc<dyn ObjectStore>> {
        self.inner.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> datafusion::common::Result<Arc<dyn ObjectStore>> {
        match self.inner.get_store(url) {
            Ok(store) => Ok(store),
            Err(_) if url.scheme() != "file" => {
                let store = Self::build(url)?;
                self.inner.register_store(url, Arc::clone(&store));
                Ok(store)
            }
            Err(e) => Err(e),
        }
    }
}
