//! `pgrelay run`: the sidecar. Starts the HTTP endpoint and both sides,
//! restarts a side after a transient failure, drains on SIGTERM.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::commands::load;
use crate::config::Config;
use crate::http::{self, Readiness};
use crate::metrics::catalog as metric;
use crate::metrics::Metrics;
use crate::{apply, capture};

/// Which sides `pgrelay run` starts.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    All,
    Capture,
    Apply,
}

pub async fn run(path: &Path, region: &str, role: Role) -> Result<ExitCode> {
    let config = load(path)?;
    config.region(region)?;
    let (with_capture, with_apply) = match role {
        Role::All => (true, true),
        Role::Capture => (true, false),
        Role::Apply => (false, true),
    };
    // only this region's secrets (and the clusters it uses) must be set
    config.require(&config.run_needs(region, with_capture, with_apply))?;
    // a CA or client certificate file the DSN names is there or not: fail
    // now, naming it, rather than retry as if the network might fix it
    crate::source::tls::check_files(&config.region(region)?.dsn)
        .map_err(|e| anyhow::anyhow!("region {region} dsn: {e}"))?;
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    readiness
        .wants_capture
        .store(with_capture, Ordering::Relaxed);
    readiness.wants_apply.store(with_apply, Ordering::Relaxed);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (overview_tx, overview) = watch::channel(String::new());
    if let Some(addr) = &config.http.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (http.listen)"))?;
        let state = http::State {
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            token: config.http.token.clone(),
            overview,
        };
        tokio::spawn(http::serve(
            listener,
            state,
            http::Limits::default(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested, draining");
        let _ = shutdown_tx.send(true);
    });

    {
        let (config, region, metrics, mut shutdown) = (
            config.clone(),
            region.to_string(),
            metrics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let mut collector = crate::overview::Collector::new();
            let mut recorder = EgressRecorder::default();
            loop {
                let pairs = crate::status::export_local(&config, &region, &metrics).await;
                let view = collector.build(&config, &region, pairs, &metrics, Instant::now());
                if with_capture {
                    recorder.record(&config, &region, &view).await;
                }
                if let Ok(json) = serde_json::to_string(&view) {
                    overview_tx.send_replace(json);
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }
    tokio::spawn(crate::verify::schedule::keep(
        config.clone(),
        region.to_string(),
        metrics.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(apply::horizon::keep(
        config.clone(),
        region.to_string(),
        shutdown.clone(),
    ));
    let deadline = Instant::now() + config.startup_timeout;
    loop {
        let result: Result<(), SideError> = async {
            if with_capture {
                capture::preflight(&config, region).await?;
            }
            if with_apply {
                apply::preflight(&config, region).await?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => break,
            Err(e) if e.is_unreachable() && Instant::now() < deadline => {
                tracing::warn!(region, error = %e, "not reachable yet, retrying (relay.startup_timeout)");
                let mut shutdown = shutdown.clone();
                tokio::select! {
                    _ = shutdown.changed() => return Ok(ExitCode::SUCCESS),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => bail!("{e}"),
        }
    }
    let mut sides = tokio::task::JoinSet::new();
    if with_capture {
        sides.spawn(supervise(
            Side::Capture,
            config.clone(),
            region.to_string(),
            metrics.clone(),
            readiness.clone(),
            shutdown.clone(),
        ));
    }
    if with_apply {
        sides.spawn(supervise(
            Side::Apply,
            config.clone(),
            region.to_string(),
            metrics.clone(),
            readiness.clone(),
            shutdown.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(joined) = sides.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if result.is_ok() {
                    result = Err(e);
                }
                sides.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => bail!("a side of the sidecar panicked: {e}"),
        }
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Leaves the capture side's egress figures in `pgrelay.egress`, where
/// `pgrelay status` reads them. Keeps one connection; a failure is logged
/// once and retried at the next collection.
#[derive(Default)]
struct EgressRecorder {
    client: Option<tokio_postgres::Client>,
    warned: bool,
}

impl EgressRecorder {
    async fn record(&mut self, config: &Config, region: &str, view: &crate::overview::Overview) {
        let (destinations, totals, rates) = crate::overview::egress_rows(view);
        if destinations.is_empty() {
            return;
        }
        let result = async {
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                let dsn = &config.region(region).map_err(|e| e.to_string())?.dsn;
                let client = crate::source::catalog::connect(dsn, region)
                    .await
                    .map_err(|e| e.to_string())?;
                self.client = Some(client);
            }
            let client = self.client.as_ref().expect("connected above");
            client
                .execute(
                    crate::overview::EGRESS_RECORD_SQL,
                    &[&destinations, &totals, &rates],
                )
                .await
                .map_err(|e| crate::source::pg_error::reason(&e))
        }
        .await;
        match result {
            Ok(_) => self.warned = false,
            Err(e) if !self.warned => {
                self.warned = true;
                tracing::warn!(region, error = %e, "cannot record egress in pgrelay.egress (run pgrelay setup if the table is missing); pgrelay status shows no egress until this works");
            }
            Err(_) => {}
        }
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[derive(Clone, Copy)]
enum Side {
    Capture,
    Apply,
}

/// Why a side stopped (or did not start), with its class.
#[derive(Debug, thiserror::Error)]
enum SideError {
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
}

impl SideError {
    fn is_transient(&self) -> bool {
        match self {
            SideError::Capture(e) => e.is_transient(),
            SideError::Apply(e) => e.is_transient(),
        }
    }

    fn is_unreachable(&self) -> bool {
        match self {
            SideError::Capture(e) => e.is_unreachable(),
            SideError::Apply(e) => e.is_unreachable(),
        }
    }
}

/// Runs one side, restarting it with backoff after transient failures.
async fn supervise(
    side: Side,
    config: Arc<Config>,
    region: String,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let (name, flag) = match side {
        Side::Capture => ("capture", &readiness.capture),
        Side::Apply => ("apply", &readiness.apply),
    };
    loop {
        let started = Instant::now();
        // the side raises the flag itself once it streams
        let result: Result<(), SideError> = match side {
            Side::Capture => capture::run(
                config.clone(),
                region.clone(),
                metrics.clone(),
                flag.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(SideError::from),
            Side::Apply => apply::run(
                config.clone(),
                region.clone(),
                metrics.clone(),
                flag.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(SideError::from),
        };
        flag.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                metrics.add(&metric::RESTARTS, &[("region", &region), ("side", name)], 1);
                if started.elapsed() > Duration::from_secs(60) {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(region = %region, side = name, error = %e, retry_in = ?delay, "side failed, restarting");
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => bail!("{e}"),
        }
    }
}
