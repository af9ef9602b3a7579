//! The HTTP port: `/metrics` (Prometheus text) and `/` (a status page for a person).

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::response::Html;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::server::NodeState;

/// The process-wide Prometheus recorder. Installed once: tests run several nodes in one
/// process, and a second install would fail.
fn recorder() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                None
            }
        })
        .as_ref()
}

/// Installs the recorder early, so metrics recorded before the first scrape are kept.
pub fn install_recorder() {
    let _ = recorder();
}

pub async fn serve(listener: tokio::net::TcpListener, state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    install_recorder();
    let app = axum::Router::new()
        .route("/metrics", get(metrics_text))
        .route("/", get(status_page))
        .with_state(state);
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

async fn metrics_text() -> String {
    recorder().map(|h| h.render()).unwrap_or_else(|| "# metrics recorder unavailable\n".into())
}

async fn status_page(State(s): State<Arc<NodeState>>) -> Html<String> {
    let stored = s.cas.stored_bytes();
    let max = s.cfg.storage.max_size_bytes;
    Html(format!(
        "<!doctype html><html><head><title>kiln node {id}</title></head><body>\
         <h1>kiln node {id}</h1><table>\
         <tr><th align=left>version</th><td>{version}</td></tr>\
         <tr><th align=left>gRPC</th><td>{grpc}</td></tr>\
         <tr><th align=left>data dir</th><td>{data}</td></tr>\
         <tr><th align=left>uptime</th><td>{up} s</td></tr>\
         <tr><th align=left>boot</th><td>{boot}</td></tr>\
         <tr><th align=left>CAS stored</th><td>{stored} of {max} bytes ({pct:.1}%)</td></tr>\
         <tr><th align=left>fsync policy</th><td>{fsync:?}</td></tr>\
         </table><p><a href=\"/metrics\">metrics</a></p></body></html>",
        id = s.cfg.node.id,
        version = env!("CARGO_PKG_VERSION"),
        grpc = s.grpc_addr,
        data = s.cfg.node.data_dir.display(),
        up = s.started.elapsed().as_secs(),
        boot = s.cas.boot(),
        pct = stored as f64 * 100.0 / max as f64,
        fsync = s.cfg.storage.fsync,
    ))
}
