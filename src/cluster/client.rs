//! The Kubernetes client: credentials from a kubeconfig or the pod's service account, an
//! optional explicit API server endpoint, and the agent's name on every request.

use std::path::Path;
use thiserror::Error;

/// Why Kubernetes mode could not start.
#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("cannot start the Kubernetes thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("Kubernetes client configuration: {0}")]
    Client(String),
}

/// `User-Agent` of every request: audit logs and API server metrics attribute the traffic.
pub const USER_AGENT: &str = concat!("netwarden/", env!("CARGO_PKG_VERSION"));

/// Builds the client. `apiserver`: an explicit endpoint (`https://10.0.0.10:6443`, or
/// `HOST:PORT`, taken as https) instead of the one the credentials name. In a pod the service
/// account's endpoint is the `kubernetes` Service VIP, reached through the kube-proxy or
/// kube-router datapath the agent may be repairing; an explicit endpoint avoids depending on
/// it (as Calico's `KUBERNETES_SERVICE_HOST` override and Cilium's `k8s-api-server` do). The
/// host must be one the API server's certificate names (its advertise address or a load
/// balancer's name are).
pub async fn client(
    kubeconfig: Option<&Path>,
    apiserver: Option<&str>,
) -> Result<kube::Client, ClusterError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| ClusterError::Client(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| ClusterError::Client(format!("{}: {e}", path.display())))?
        }
        // In a pod: the service account; else $KUBECONFIG or ~/.kube/config.
        None => kube::Config::infer()
            .await
            .map_err(|e| ClusterError::Client(e.to_string()))?,
    };
    if let Some(url) = apiserver {
        config.cluster_url = endpoint(url)?;
    }
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    // The agent's own retries know what failed (src/cluster/retry.rs); kube's layer would
    // repeat 429 and 5xx answers behind their back, beyond the backoff they keep.
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| ClusterError::Client(e.to_string()))
}

/// The endpoint as a URL: `https://` assumed when no scheme is given.
pub fn endpoint(s: &str) -> Result<http::Uri, ClusterError> {
    let s = s.trim();
    let url = if s.contains("://") {
        s.to_owned()
    } else {
        format!("https://{s}")
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ClusterError::Client(format!("API server endpoint `{s}`: {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https" | "http"), Some(h)) if !h.is_empty() && matches!(uri.path(), "/" | "") => {
            Ok(uri)
        }
        _ => Err(ClusterError::Client(format!(
            "API server endpoint `{s}`: use https://HOST[:PORT] (or HOST:PORT)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_as_operators_write_them() {
        assert_eq!(
            endpoint("10.0.0.10:6443").unwrap().to_string(),
            "https://10.0.0.10:6443/"
        );
        assert_eq!(
            endpoint("https://api.example:6443/").unwrap().to_string(),
            "https://api.example:6443/"
        );
        assert_eq!(
            endpoint("http://127.0.0.1:8080").unwrap().to_string(),
            "http://127.0.0.1:8080/"
        );
        for bad in ["", "ftp://x", "https://x/api", "https://"] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
        assert!(USER_AGENT.starts_with("netwarden/"));
    }
}
