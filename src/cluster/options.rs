//! What the Kubernetes side is started with, and a config as it was loaded: plain data shared by
//! the config loop (`run`) and the optional watches (`optional`).

use super::needs::{self, Needs};
use crate::config::Config;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Options {
    pub kubeconfig: Option<PathBuf>,
    /// An explicit API server endpoint instead of the credentials' one.
    pub apiserver: Option<String>,
    pub node_name: String,
    /// `None`: the client's default namespace (in a pod, its service account's).
    pub configmap_namespace: Option<String>,
    pub configmap_name: String,
    pub configmap_key: String,
    pub service_selector: Option<String>,
    pub state_file: PathBuf,
    /// Repairs are summed over this window per Event ([`super::events::WINDOW`]).
    pub event_window: Duration,
    /// Protection failing for longer than this sets the Node condition to False.
    pub condition_after: Duration,
    /// Shrinks every retry delay of the API client (tests).
    pub backoff_scale: f64,
    /// The network namespace the agent enforces in (`dev:inode`), recorded in the state file.
    pub netns_id: Option<String>,
}

impl Options {
    pub(super) fn source(&self, namespace: &str) -> String {
        format!(
            "ConfigMap {}/{} key {}",
            namespace, self.configmap_name, self.configmap_key
        )
    }
}

/// A config: its text, parsed, and what it needs from the cluster.
pub(super) struct Loaded {
    pub(super) text: String,
    pub(super) config: Arc<Config>,
    pub(super) needs: Needs,
}

impl Loaded {
    pub(super) fn new(text: String, config: Config) -> Loaded {
        let needs = needs::needs(&config);
        Loaded {
            text,
            config: Arc::new(config),
            needs,
        }
    }
}
