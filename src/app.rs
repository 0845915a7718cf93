//! Wiring for `preagg-proxy serve`: logging, rules, metrics, the engine (connected in the
//! background so the proxy serves pass-through from its first second), and the listeners.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::admin::Admin;
use crate::config::{Config, Mode, SettingsArgs};
use crate::http::listener::{self, ListenerSettings, Workers};
use crate::http::tls_listener::ListenerTls;
use crate::log_lines;
use crate::log_lines::LogFormat;
use crate::preagg::Engine;
use crate::preagg::EngineSlot;
use crate::preagg::statements::ClickHouse;
use crate::preagg::store::Store;
use crate::proxy::Proxy;
use crate::rules;
use crate::shadow::Shadow;
use crate::sql::rule::Rule;

/// Changes the log filter of a running process.
pub type LogFilterHandle = reload::Handle<EnvFilter, Registry>;

/// Installs the tracing subscriber (text or JSON lines on stderr, batched on worker threads: see
/// [`log_lines`]); the filter can be reloaded.
pub fn init_logging(format: LogFormat, filter: &str) -> LogFilterHandle {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let (filter, handle) = reload::Layer::new(filter);
    log_lines::set_format(format);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let lines = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(log_lines::Stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry.with(lines).try_init(),
        LogFormat::Json => registry.with(lines.json().flatten_event(true)).try_init(),
    };
    handle
}

/// Where the configuration came from, to read it again on SIGHUP.
pub struct ConfigSource {
    /// Flags and environment given at start.
    pub args: SettingsArgs,
    /// The `--config` file, if any.
    pub file: Option<PathBuf>,
    /// The log filter handle.
    pub log: LogFilterHandle,
}

/// Loads the rule files of the configured directory.
pub fn load_rules(config: &Config) -> anyhow::Result<Vec<Arc<Rule>>> {
    let rules = rules::load_dir(&config.rules)?;
    Ok(rules.into_iter().map(Arc::new).collect())
}

/// Runs the proxy until SIGTERM/SIGINT, then drains. SIGHUP reloads the configuration file and the
/// rules without dropping connections.
pub async fn serve(config: Config, source: ConfigSource) -> anyhow::Result<()> {
    for line in config.redacted_lines() {
        tracing::info!(target: "preagg_proxy::config", "{line}");
    }
    let https = |endpoint: &crate::http::pool::Endpoint| endpoint.uri.scheme_str() == Some("https");
    if let Some(file) = config.tls_ca_file.ca_file()
        && !https(&config.upstream)
        && !https(config.clickhouse_endpoint())
    {
        tracing::warn!(file = %file.display(), "tls_ca_file has no effect: neither upstream nor clickhouse_url is https://");
    }
    let rules = load_rules(&config)?;
    for rule in &rules {
        tracing::info!(rule = %rule.name, version = rule.version, file = %rule.file.display(), "rule loaded");
    }
    let metrics = crate::metrics::install().context("installing the metrics recorder")?;
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let admin_listener =
        TcpListener::bind(config.admin_listen).await.with_context(|| format!("binding {}", config.admin_listen))?;
    let engine: EngineSlot = Arc::new(OnceLock::new());
    let pending = PendingReload::default();
    if config.mode != Mode::Off {
        tokio::spawn(connect_engine(config.clone(), rules.clone(), Arc::clone(&engine), Arc::clone(&pending)));
    }
    let shadow = Shadow::start(&config, Arc::clone(&engine));
    let admin = Admin::new(&config, Arc::clone(&engine), Some(Arc::clone(&shadow)), metrics);
    let proxy = Arc::new(Proxy::new(&config, Arc::clone(&engine), Some(Arc::clone(&shadow))));
    let listen_tls = config.tls_cert_file.as_ref().map(ListenerTls::new);
    let reloader = Reloader {
        source,
        config: config.clone(),
        engine: Arc::clone(&engine),
        pending,
        proxy: Arc::clone(&proxy),
        shadow,
        listen_tls: listen_tls.clone(),
    };
    tokio::spawn(reloader.run());
    let shutdown = CancellationToken::new();
    let (listen, admin_addr) = (listener.local_addr()?, admin_listener.local_addr()?);
    tracing::info!(
        listen = %listen,
        scheme = if listen_tls.is_some() { "https" } else { "http" },
        admin = %admin_addr,
        upstream = %config.upstream.redacted(),
        workers = config.workers,
        "serving"
    );
    let settings = ListenerSettings {
        tls: listen_tls.clone(),
        send_timeout: config.client_send_timeout,
        grace: config.shutdown_grace,
    };
    let workers = Workers::start(
        config.workers,
        || {
            let proxy = Arc::new(proxy.for_worker(config.workers));
            move |request, peer| Arc::clone(&proxy).handle(request, peer)
        },
        settings.clone(),
    )
    .context("starting the worker threads")?;
    let admin_task = tokio::spawn(listener::serve(
        admin_listener,
        move |request, _| Arc::clone(&admin).handle(request),
        shutdown.clone(),
        ListenerSettings { tls: None, ..settings },
    ));
    // The accept loop ends before a signal only when it cannot be set up.
    let accepted = tokio::select! {
        accepted = workers.accept(listener, &shutdown) => accepted,
        () = listener::termination_signal() => Ok(()),
    };
    match &accepted {
        Ok(()) => tracing::info!("shutdown requested"),
        Err(error) => tracing::error!(%error, "the accept loop could not start; stopping"),
    }
    shutdown.cancel();
    let _ = tokio::join!(workers.join(), admin_task);
    if let Some(engine) = engine.get() {
        engine.stop().await;
    }
    tracing::info!("stopped");
    accepted.context("accepting client connections")
}

/// Reloads the configuration on SIGHUP.
struct Reloader {
    source: ConfigSource,
    config: Config,
    engine: EngineSlot,
    /// Where a reload waits while the engine is not connected yet.
    pending: PendingReload,
    proxy: Arc<Proxy>,
    shadow: Arc<Shadow>,
    /// The client listener's TLS, whose certificate a reload replaces.
    listen_tls: Option<ListenerTls>,
}

impl Reloader {
    async fn run(mut self) {
        let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; configuration reload is off");
            return;
        };
        while hangups.recv().await.is_some() {
            match self.reload().await {
                Ok(()) => tracing::info!("configuration reloaded"),
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "reload failed; keeping the running configuration")
                }
            }
        }
    }

    /// Reads the file, the rules and the listener's certificate again; applies what can change
    /// while running and names what needs a restart.
    async fn reload(&mut self) -> anyhow::Result<()> {
        // Everything that can be wrong with the new configuration is found before any of it is
        // applied; the certificate goes first, so that no rule's DDL can hold up its renewal.
        let config = Config::load(&self.source.args, self.source.file.as_deref())?;
        let rules = load_rules(&config)?;
        let log_filter = EnvFilter::try_new(&config.log_filter)?;
        match (&self.listen_tls, &config.tls_cert_file) {
            (Some(tls), Some(cert)) => tls.replace(cert),
            (None, None) => {}
            (None, Some(_)) | (Some(_), None) => {
                tracing::warn!("turning TLS on the client listener on or off takes effect after a restart");
            }
        }
        // Under the pending lock, which `connect_engine` holds from publishing the engine until
        // it has applied what was left there: either the engine is here and this reload applies
        // after any earlier one, or it is left for `connect_engine` to find.
        let mut pending = self.pending.lock().await;
        match self.engine.get() {
            Some(engine) => {
                let certificate = if self.listen_tls.is_some() && config.tls_cert_file.is_some() {
                    "; the listener's new certificate is in use already"
                } else {
                    ""
                };
                apply_reload(engine, &config, rules)
                    .await
                    .with_context(|| format!("rules and settings not reloaded{certificate}"))?;
            }
            None => *pending = Some((config.clone(), rules)),
        }
        drop(pending);
        self.proxy.reload(&config);
        self.shadow.set_sample_rate(config.shadow_sample_rate);
        self.source.log.reload(log_filter)?;
        let before: Vec<String> = self.config.redacted_lines();
        let after: Vec<String> = config.redacted_lines();
        let changed: Vec<&str> = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| a != b)
            .filter_map(|(a, _)| a.split(" = ").next())
            .filter(|key| RESTART_KEYS.contains(key))
            .collect();
        if !changed.is_empty() {
            tracing::warn!(keys = ?changed, "these keys only take effect after a restart");
        }
        self.config = config;
        Ok(())
    }
}

/// Keys read once at start: listeners, connections, caches, logging format and mode `off`.
const RESTART_KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "upstream",
    "store",
    "store_timeout",
    "clickhouse_url",
    "tls_ca_file",
    "clickhouse_user",
    "clickhouse_password",
    "preagg_database",
    "cluster",
    "connect_timeout",
    "upstream_timeout",
    "shutdown_grace",
    "client_send_timeout",
    "client_receive_timeout",
    "workers",
    "log_format",
    "job_cache_capacity",
    "job_cache_ttl",
    "max_concurrent_builds",
    "build_timeout",
    "shadow_concurrency",
    "shadow_queue",
    "shadow_noise",
    "shadow_float_tolerance",
    "shadow_timeout",
    "shadow_samples",
    "admin_token",
];

/// A reload that came before the engine was connected: its configuration and rules.
type PendingReload = Arc<tokio::sync::Mutex<Option<(Config, Vec<Arc<Rule>>)>>>;

/// Gives a running engine the reloadable part of a new configuration and its rules.
async fn apply_reload(engine: &Engine, config: &Config, rules: Vec<Arc<Rule>>) -> anyhow::Result<()> {
    engine.replace_rules(rules).await.context("creating tables for the new rules")?;
    engine.reload_settings(config);
    Ok(())
}

/// Connects the job store and ClickHouse, creates the tables, and publishes the engine; retries
/// until it succeeds. Until then queries pass through with `store_unavailable`.
async fn connect_engine(config: Config, rules: Vec<Arc<Rule>>, slot: EngineSlot, pending: PendingReload) {
    let mut delay = Duration::from_millis(500);
    loop {
        match build_engine(&config, rules.clone()).await {
            Ok(engine) => {
                // The engine was made from the configuration at start; a reload since then applies
                // now, before any later one (which waits for the lock).
                let mut pending = pending.lock().await;
                let _ = slot.set(Arc::clone(&engine));
                tracing::info!("engine ready: job store connected, tables present");
                if let Some((config, rules)) = pending.take()
                    && let Err(error) = apply_reload(&engine, &config, rules).await
                {
                    tracing::error!(error = %format!("{error:#}"), "applying the reload that came before the engine was ready");
                }
                return;
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), retry_in = ?delay, "engine not ready; queries pass through");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Connects everything the engine needs.
pub async fn build_engine(config: &Config, rules: Vec<Arc<Rule>>) -> anyhow::Result<Arc<Engine>> {
    let store =
        Store::connect(config.store.as_str(), config.store_timeout).await.context("connecting the job store")?;
    let clickhouse = ClickHouse::new(config);
    let engine = Arc::new(Engine::new(config, rules, store, clickhouse));
    engine.ensure_tables().await.context("creating the preaggregate tables")?;
    Ok(engine)
}
