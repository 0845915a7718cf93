//! Configuration: one table of keys, three sources.
//!
//! Every key has one name used everywhere: `seal_after` in the TOML file, `PREAGG_SEAL_AFTER` in the
//! environment and `--seal-after` on the command line. Precedence is flag > environment > file >
//! default. Values are parsed by the key's type once all sources are merged, and a bad value is an
//! error naming the key and where the value came from.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};

use crate::http::pool::Endpoint;
use crate::http::tls::{ClientTls, TlsError};
use crate::http::tls_listener::ListenerCert;
use crate::log_lines::LogFormat;
pub use crate::sql::rule::Mode;

/// One configuration key: its name, default and documentation.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// Key name as written in the TOML file (`snake_case`).
    pub name: &'static str,
    /// Default value in the same text form a user would write; `None` means unset.
    pub default: Option<&'static str>,
    /// One-line description (also the `--help` text).
    pub help: &'static str,
    /// Whether the value is a credential that must never be logged.
    pub secret: bool,
}

const fn key(name: &'static str, default: Option<&'static str>, help: &'static str) -> KeySpec {
    KeySpec { name, default, help, secret: false }
}

const fn secret(name: &'static str, help: &'static str) -> KeySpec {
    KeySpec { name, default: None, help, secret: true }
}

/// Every configuration key the proxy knows, in documentation order.
pub const KEYS: &[KeySpec] = &[
    key("listen", Some("127.0.0.1:8124"), "Address the proxy listens on for ClickHouse HTTP clients"),
    key(
        "tls_cert_file",
        None,
        "PEM certificate chain (server certificate first): with tls_key_file, `listen` speaks HTTPS only",
    ),
    key("tls_key_file", None, "PEM private key of tls_cert_file (PKCS#8, PKCS#1 or SEC1)"),
    key(
        "client_send_timeout",
        Some("60s"),
        "Longest a client may take none of an answer before its connection is dropped (nginx's send_timeout)",
    ),
    key(
        "client_receive_timeout",
        Some("30s"),
        "Longest a client may send none of a query body the proxy reads before it gets 400 (ClickHouse's http_receive_timeout)",
    ),
    key("upstream", Some("http://127.0.0.1:8123"), "ClickHouse HTTP endpoint queries are forwarded to"),
    key("store", Some("sqlite://preagg-jobs.db"), "Job store: sqlite://PATH (embedded default) or postgres://..."),
    key(
        "store_timeout",
        Some("1s"),
        "Longest a query waits for the job store; after a failure the store is left alone 5s",
    ),
    key("rules", Some("rules"), "Directory of rule files (*.toml), loaded at start"),
    key(
        "mode",
        Some("rewrite"),
        "rewrite (serve from preaggregates), shadow (compare, always answer with the original) or off",
    ),
    key("log_format", Some("text"), "Log line format: text or json"),
    key("log_filter", Some("info"), "tracing filter directives, e.g. info or preagg_proxy=debug"),
    key(
        "max_body_bytes",
        Some("16777216"),
        "Largest request body read as query text; larger non-INSERT bodies get 413",
    ),
    key("connect_timeout", Some("5s"), "Upstream TCP connect timeout (502 when exceeded)"),
    key("upstream_timeout", Some("600s"), "Time allowed for the upstream response headers (504 when exceeded)"),
    key("shutdown_grace", Some("30s"), "On SIGTERM/SIGINT, how long in-flight requests may drain"),
    key(
        "workers",
        None,
        "Threads serving clients, each with its own event loop and upstream pool (default: one per CPU)",
    ),
    key("clickhouse_url", None, "ClickHouse HTTP endpoint for the proxy's own statements (default: upstream)"),
    key(
        "tls_ca_file",
        None,
        "PEM file of the authorities that https upstream and clickhouse_url certificates must chain to (default: the web's roots)",
    ),
    key("clickhouse_user", Some("default"), "User for the proxy's own statements (DDL, builds)"),
    secret("clickhouse_password", "Password for the proxy's own statements"),
    key("preagg_database", Some("default"), "Database that holds the preaggregated tables"),
    key("cluster", None, "ClickHouse cluster name: ON CLUSTER DDL and a Distributed table over local ones"),
    key("seal_after", Some("2h"), "A window is built only once its end is this much older than now"),
    key("expiry_buffer", Some("1h"), "Jobs expiring within this buffer are not served"),
    key("expiry_bands", Some("1d=1h,4d=18h,*=7d"), "Job lifetime by how soon after its window's end it was built"),
    key(
        "build",
        Some("background"),
        "background (first query answered by the original) or wait (first query waits for the build)",
    ),
    key("build_wait_timeout", Some("30s"), "With build=wait: longest a query waits for its windows"),
    key("build_timeout", Some("15m"), "Longest a single build statement may run"),
    key("lease_duration", Some("2m"), "A pending job whose lease is older than this is taken over by another proxy"),
    key(
        "build_retry_after",
        Some("1m"),
        "After a failed build, how long its windows are left alone before a query retries them",
    ),
    key("max_concurrent_builds", Some("2"), "Builds running at once in this process"),
    key(
        "max_queued_builds",
        Some("32"),
        "Builds waiting for a slot in this process; a query that would queue more passes through (build_queue_full)",
    ),
    key("job_cache_capacity", Some("10000"), "Job lookups cached in memory (entries)"),
    key("job_cache_ttl", Some("30s"), "How long a cached job lookup is trusted before it is read again"),
    key("jobs_per_user", Some("false"), "Keep preaggregates per ClickHouse user (the user joins the query hash)"),
    key(
        "max_parse_time",
        Some("50ms"),
        "CPU-time budget for analyzing one query; slower analysis passes the query through",
    ),
    key("shadow_sample_rate", Some("1.0"), "Share of matching queries compared in shadow mode (0.0 to 1.0)"),
    key("shadow_concurrency", Some("2"), "Shadow comparisons running at once"),
    key("shadow_queue", Some("64"), "Shadow comparisons waiting; more are dropped and counted"),
    key("shadow_noise", Some("false"), "Also run the original twice to measure original-vs-original noise"),
    key("shadow_float_tolerance", Some("1e-9"), "Relative tolerance when comparing floats in shadow mode"),
    key("shadow_timeout", Some("120s"), "Longest a shadow comparison may run"),
    key("shadow_samples", Some("100"), "Mismatch samples kept in the job store"),
    key("admin_listen", Some("127.0.0.1:8125"), "Address of the admin API, status page and /metrics"),
    secret("admin_token", "Bearer token required by the admin API (unset: no token required)"),
];

/// Where a configuration value came from; errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A `--flag` on the command line.
    Flag,
    /// A `PREAGG_*` environment variable.
    Env,
    /// The `--config` TOML file.
    File,
    /// The built-in default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Flag => "command-line flag",
            Source::Env => "environment",
            Source::File => "config file",
            Source::Default => "default",
        })
    }
}

/// Configuration errors, each naming the offending key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse for its key.
    #[error("configuration key `{key}` (from {origin}, env {env}): {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Its environment variable.
        env: String,
        /// Where the value came from.
        origin: Source,
        /// What is wrong.
        message: String,
    },
    /// The config file could not be read or is not valid TOML.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The config file names a key that does not exist.
    #[error("config file {path}: unknown key `{key}` (known keys: see `preagg-proxy serve --help`)")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
}

/// Environment variable name of a key.
pub fn env_name(key: &str) -> String {
    format!("PREAGG_{}", key.to_ascii_uppercase())
}

fn flag_name(key: &str) -> String {
    key.replace('_', "-")
}

/// Settings given on the command line or in the environment, before merging with the file.
#[derive(Debug, Clone, Default)]
pub struct SettingsArgs {
    values: BTreeMap<&'static str, (String, Source)>,
}

impl SettingsArgs {
    /// Sets a value as if given by a flag (used by tests and subcommands).
    pub fn set(&mut self, key: &'static str, value: impl Into<String>) {
        self.values.insert(key, (value.into(), Source::Flag));
    }
}

impl FromArgMatches for SettingsArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut values = BTreeMap::new();
        for spec in KEYS {
            if let Some(value) = matches.get_one::<String>(spec.name) {
                let source = match matches.value_source(spec.name) {
                    Some(ValueSource::EnvVariable) => Source::Env,
                    _ => Source::Flag,
                };
                values.insert(spec.name, (value.clone(), source));
            }
        }
        Ok(SettingsArgs { values })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for SettingsArgs {
    fn augment_args(mut cmd: Command) -> Command {
        for spec in KEYS {
            let mut help = spec.help.to_string();
            if let Some(default) = spec.default {
                help.push_str(&format!(" [default: {default}]"));
            }
            let mut arg = Arg::new(spec.name)
                .long(flag_name(spec.name))
                .env(env_name(spec.name))
                .value_name("VALUE")
                .help(help)
                .help_heading("Configuration (flag > PREAGG_* environment > --config file > default)")
                .global(true);
            if spec.secret {
                arg = arg.hide_env_values(true);
            }
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// When a query whose windows are missing gets its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildPolicy {
    /// Answer with the original at once; build in the background.
    Background,
    /// Wait (bounded) for the build, then answer with the rewrite.
    Wait,
}

/// Job lifetime by the age of the window's end at build time: `(max age, lifetime)`, sorted by
/// age; the last band has no age limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryBands {
    /// Bands with an upper age bound, ascending.
    pub bands: Vec<(Duration, Duration)>,
    /// Lifetime of windows older than every band.
    pub otherwise: Duration,
}

impl ExpiryBands {
    /// Lifetime of a job whose window ended `age` before it was built.
    pub fn lifetime(&self, age: Duration) -> Duration {
        self.bands.iter().find(|(limit, _)| age <= *limit).map(|(_, life)| *life).unwrap_or(self.otherwise)
    }
}

/// A credential that prints as `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub Option<String>);

impl Secret {
    /// The value, for use (never for logging).
    pub fn expose(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "***" } else { "(unset)" })
    }
}

/// The effective, typed configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listen address.
    pub listen: SocketAddr,
    /// The certificate the client listener presents; `None`: plain HTTP.
    pub listen_tls: Option<ListenerCert>,
    /// How long a client may take none of an answer.
    pub client_send_timeout: Duration,
    /// How long a client may send none of a query body the proxy reads.
    pub client_receive_timeout: Duration,
    /// ClickHouse endpoint that receives forwarded queries.
    pub upstream: Endpoint,
    /// Job store URL.
    pub store: String,
    /// Job store wait bound.
    pub store_timeout: Duration,
    /// Rule directory.
    pub rules: PathBuf,
    /// Rewrite mode.
    pub mode: Mode,
    /// Log format.
    pub log_format: LogFormat,
    /// tracing filter directives.
    pub log_filter: String,
    /// Request body cap.
    pub max_body_bytes: usize,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Upstream response-header timeout.
    pub upstream_timeout: Duration,
    /// Drain deadline on shutdown.
    pub shutdown_grace: Duration,
    /// Threads serving client connections.
    pub workers: usize,
    /// Endpoint for the proxy's own statements.
    pub clickhouse_url: Endpoint,
    /// The authorities `https://` endpoints must chain to.
    pub tls: ClientTls,
    /// User for the proxy's own statements.
    pub clickhouse_user: String,
    /// Password for the proxy's own statements.
    pub clickhouse_password: Secret,
    /// Database of the preaggregated tables.
    pub preagg_database: String,
    /// Cluster name for cluster mode.
    pub cluster: Option<String>,
    /// Sealing delay.
    pub seal_after: Duration,
    /// Expiry buffer.
    pub expiry_buffer: Duration,
    /// Job lifetimes.
    pub expiry_bands: ExpiryBands,
    /// Build policy.
    pub build: BuildPolicy,
    /// Wait bound with `build = wait`.
    pub build_wait_timeout: Duration,
    /// Build statement timeout.
    pub build_timeout: Duration,
    /// Lease length of a pending job.
    pub lease_duration: Duration,
    /// Pause before retrying windows whose build failed.
    pub build_retry_after: Duration,
    /// Concurrent builds.
    pub max_concurrent_builds: usize,
    /// Builds waiting for one of the `max_concurrent_builds` slots; beyond it none is started.
    pub max_queued_builds: usize,
    /// Job cache size.
    pub job_cache_capacity: u64,
    /// Job cache TTL.
    pub job_cache_ttl: Duration,
    /// Per-user preaggregates.
    pub jobs_per_user: bool,
    /// Analysis time budget per query.
    pub max_parse_time: Duration,
    /// Shadow sampling share.
    pub shadow_sample_rate: f64,
    /// Shadow concurrency.
    pub shadow_concurrency: usize,
    /// Shadow queue length.
    pub shadow_queue: usize,
    /// Shadow noise measurement.
    pub shadow_noise: bool,
    /// Shadow float tolerance.
    pub shadow_float_tolerance: f64,
    /// Shadow comparison timeout.
    pub shadow_timeout: Duration,
    /// Mismatch samples kept.
    pub shadow_samples: usize,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Admin bearer token.
    pub admin_token: Secret,
}

/// Merged raw values: key -> (text, source).
struct Merged {
    values: BTreeMap<&'static str, (String, Source)>,
}

impl Merged {
    fn get(&self, key: &'static str) -> Option<(&str, Source)> {
        self.values.get(key).map(|(v, s)| (v.as_str(), *s))
    }

    fn parse<T>(&self, key: &'static str, parse: impl Fn(&str) -> Result<T, String>) -> Result<T, ConfigError> {
        let (text, source) = self.get(key).ok_or_else(|| ConfigError::Invalid {
            key,
            env: env_name(key),
            origin: Source::Default,
            message: "a value is required".into(),
        })?;
        parse(text).map_err(|message| ConfigError::Invalid { key, env: env_name(key), origin: source, message })
    }

    /// The listener's certificate: `tls_cert_file` and `tls_key_file` together, or neither.
    fn listener_cert(&self) -> Result<Option<ListenerCert>, ConfigError> {
        let path = |s: &str| Ok(PathBuf::from(s));
        match (self.optional("tls_cert_file", path)?, self.optional("tls_key_file", path)?) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => ListenerCert::load(&cert, &key).map(Some).map_err(|error| {
                let blamed = match &error {
                    TlsError::Key { .. } => "tls_key_file",
                    TlsError::Unreadable { path, .. } if *path == key => "tls_key_file",
                    _ => "tls_cert_file",
                };
                self.invalid(blamed, error.to_string())
            }),
            (Some(_), None) => Err(self.invalid("tls_key_file", "a value is required with `tls_cert_file`".into())),
            (None, Some(_)) => Err(self.invalid("tls_cert_file", "a value is required with `tls_key_file`".into())),
        }
    }

    /// The error for `key`, naming where its value came from.
    fn invalid(&self, key: &'static str, message: String) -> ConfigError {
        let origin = self.get(key).map_or(Source::Default, |(_, source)| source);
        ConfigError::Invalid { key, env: env_name(key), origin, message }
    }

    fn optional<T>(
        &self,
        key: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(("", _)) => Ok(None),
            Some(_) => self.parse(key, parse).map(Some),
        }
    }
}

impl Config {
    /// Merges defaults, the optional TOML file and the command line/environment, then types every
    /// value.
    pub fn load(args: &SettingsArgs, file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut values: BTreeMap<&'static str, (String, Source)> = KEYS
            .iter()
            .filter_map(|spec| spec.default.map(|d| (spec.name, (d.to_string(), Source::Default))))
            .collect();
        if let Some(path) = file {
            for (name, value) in read_file(path)? {
                values.insert(name, (value, Source::File));
            }
        }
        for (name, value) in &args.values {
            values.insert(name, value.clone());
        }
        Config::from_merged(&Merged { values })
    }

    fn from_merged(m: &Merged) -> Result<Config, ConfigError> {
        let upstream = m.parse("upstream", parse_endpoint)?;
        let clickhouse_url = m.optional("clickhouse_url", parse_endpoint)?.unwrap_or_else(|| upstream.clone());
        Ok(Config {
            listen: m.parse("listen", parse_addr)?,
            listen_tls: m.listener_cert()?,
            client_send_timeout: m.parse("client_send_timeout", parse_positive_duration)?,
            client_receive_timeout: m.parse("client_receive_timeout", parse_positive_duration)?,
            upstream,
            store: m.parse("store", parse_store)?,
            store_timeout: m.parse("store_timeout", parse_duration)?,
            rules: m.parse("rules", |s| Ok(PathBuf::from(s)))?,
            mode: m.parse("mode", parse_enum)?,
            log_format: m.parse("log_format", parse_enum)?,
            log_filter: m.parse("log_filter", |s| Ok(s.to_string()))?,
            max_body_bytes: m.parse("max_body_bytes", parse_positive)?,
            connect_timeout: m.parse("connect_timeout", parse_duration)?,
            upstream_timeout: m.parse("upstream_timeout", parse_duration)?,
            shutdown_grace: m.parse("shutdown_grace", parse_duration)?,
            workers: m.optional("workers", parse_positive)?.unwrap_or_else(default_workers),
            clickhouse_url,
            tls: m
                .optional("tls_ca_file", |s| ClientTls::from_ca_file(Path::new(s)).map_err(|e| e.to_string()))?
                .unwrap_or_default(),
            clickhouse_user: m.parse("clickhouse_user", |s| Ok(s.to_string()))?,
            clickhouse_password: Secret(m.optional("clickhouse_password", |s| Ok(s.to_string()))?),
            preagg_database: m.parse("preagg_database", parse_identifier)?,
            cluster: m.optional("cluster", parse_identifier)?,
            seal_after: m.parse("seal_after", parse_duration)?,
            expiry_buffer: m.parse("expiry_buffer", parse_duration)?,
            expiry_bands: m.parse("expiry_bands", parse_expiry_bands)?,
            build: m.parse("build", parse_enum)?,
            build_wait_timeout: m.parse("build_wait_timeout", parse_duration)?,
            build_timeout: m.parse("build_timeout", parse_duration)?,
            lease_duration: m.parse("lease_duration", parse_duration)?,
            build_retry_after: m.parse("build_retry_after", parse_duration)?,
            max_concurrent_builds: m.parse("max_concurrent_builds", parse_positive)?,
            max_queued_builds: m.parse("max_queued_builds", parse_positive)?,
            job_cache_capacity: m.parse("job_cache_capacity", parse_positive::<u64>)?,
            job_cache_ttl: m.parse("job_cache_ttl", parse_duration)?,
            jobs_per_user: m.parse("jobs_per_user", parse_bool)?,
            max_parse_time: m.parse("max_parse_time", parse_duration)?,
            shadow_sample_rate: m.parse("shadow_sample_rate", parse_share)?,
            shadow_concurrency: m.parse("shadow_concurrency", parse_positive)?,
            shadow_queue: m.parse("shadow_queue", parse_positive)?,
            shadow_noise: m.parse("shadow_noise", parse_bool)?,
            shadow_float_tolerance: m.parse("shadow_float_tolerance", parse_tolerance)?,
            shadow_timeout: m.parse("shadow_timeout", parse_duration)?,
            shadow_samples: m.parse("shadow_samples", parse_positive)?,
            admin_listen: m.parse("admin_listen", parse_addr)?,
            admin_token: Secret(m.optional("admin_token", |s| Ok(s.to_string()))?),
        })
    }

    /// The effective configuration as `key = value` lines, credentials redacted.
    pub fn redacted_lines(&self) -> Vec<String> {
        let store = redact_url_password(&self.store);
        vec![
            format!("listen = {}", self.listen),
            format!(
                "tls_cert_file = {}",
                self.listen_tls.as_ref().map_or("(none)".to_string(), ListenerCert::describe_chain)
            ),
            format!(
                "tls_key_file = {}",
                self.listen_tls.as_ref().map_or("(none)".to_string(), ListenerCert::describe_key_file)
            ),
            format!("client_send_timeout = {:?}", self.client_send_timeout),
            format!("client_receive_timeout = {:?}", self.client_receive_timeout),
            format!("upstream = {}", self.upstream.redacted()),
            format!("store = {store}"),
            format!("store_timeout = {:?}", self.store_timeout),
            format!("rules = {}", self.rules.display()),
            format!("mode = {:?}", self.mode),
            format!("log_format = {:?}", self.log_format),
            format!("max_body_bytes = {}", self.max_body_bytes),
            format!("connect_timeout = {:?}", self.connect_timeout),
            format!("upstream_timeout = {:?}", self.upstream_timeout),
            format!("shutdown_grace = {:?}", self.shutdown_grace),
            format!("workers = {}", self.workers),
            format!("clickhouse_url = {}", self.clickhouse_url.redacted()),
            format!("tls_ca_file = {}", self.tls),
            format!("clickhouse_user = {}", self.clickhouse_user),
            format!("clickhouse_password = {:?}", self.clickhouse_password),
            format!("preagg_database = {}", self.preagg_database),
            format!("cluster = {}", self.cluster.as_deref().unwrap_or("(none)")),
            format!("seal_after = {:?}", self.seal_after),
            format!("expiry_buffer = {:?}", self.expiry_buffer),
            format!("expiry_bands = {:?}", self.expiry_bands),
            format!("build = {:?}", self.build),
            format!("build_wait_timeout = {:?}", self.build_wait_timeout),
            format!("build_timeout = {:?}", self.build_timeout),
            format!("lease_duration = {:?}", self.lease_duration),
            format!("build_retry_after = {:?}", self.build_retry_after),
            format!("max_concurrent_builds = {}", self.max_concurrent_builds),
            format!("max_queued_builds = {}", self.max_queued_builds),
            format!("job_cache_capacity = {}", self.job_cache_capacity),
            format!("job_cache_ttl = {:?}", self.job_cache_ttl),
            format!("jobs_per_user = {}", self.jobs_per_user),
            format!("max_parse_time = {:?}", self.max_parse_time),
            format!("shadow_sample_rate = {}", self.shadow_sample_rate),
            format!("shadow_concurrency = {}", self.shadow_concurrency),
            format!("shadow_queue = {}", self.shadow_queue),
            format!("shadow_noise = {}", self.shadow_noise),
            format!("shadow_float_tolerance = {}", self.shadow_float_tolerance),
            format!("shadow_timeout = {:?}", self.shadow_timeout),
            format!("shadow_samples = {}", self.shadow_samples),
            format!("admin_listen = {}", self.admin_listen),
            format!("admin_token = {:?}", self.admin_token),
        ]
    }
}

fn read_file(path: &Path) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let file_error = |message: String| ConfigError::File { path: path.to_path_buf(), message };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| file_error(e.to_string()))?;
    let mut out = Vec::new();
    for (name, value) in table {
        let spec = KEYS
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| ConfigError::UnknownKey { path: path.to_path_buf(), key: name.clone() })?;
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(file_error(format!(
                    "key `{name}` must be a string, number or boolean, found {}",
                    other.type_str()
                )));
            }
        };
        out.push((spec.name, text));
    }
    Ok(out)
}

fn redact_url_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("`{s}` is not a socket address such as 127.0.0.1:8124"))
}

fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{s}` must start with http:// or https://")),
    }
    if uri.host().is_none() {
        return Err(format!("`{s}` has no host"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("credentials do not belong in the URL: clients send their own, and the proxy's own \
                    statements use clickhouse_user and clickhouse_password"
            .to_string());
    }
    if uri.query().is_some() {
        return Err(format!("`{s}` must not carry a query string"));
    }
    Ok(Endpoint { uri })
}

/// A value of an enum-like key, by the names its `serde` derive gives its variants.
fn parse_enum<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    use serde::de::IntoDeserializer as _;
    T::deserialize(s.into_deserializer()).map_err(|e: serde::de::value::Error| format!("`{s}`: {e}"))
}

fn parse_store(s: &str) -> Result<String, String> {
    if s.starts_with("sqlite:") || s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(s.to_string())
    } else {
        Err(format!("`{}` must be sqlite://PATH or postgres://...", redact_url_password(s)))
    }
}

/// Parses a humantime duration such as `2h`, `90s` or `1d 6h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration such as 30s, 2h or 7d: {e}"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err(format!("`{s}` is no time at all: give a positive duration such as 60s")),
        positive => Ok(positive),
    }
}

fn parse_positive<T: std::str::FromStr + PartialOrd + Default>(s: &str) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(v) if v > T::default() => Ok(v),
        _ => Err(format!("`{s}` is not a positive whole number")),
    }
}

/// One serving thread per CPU the process may use.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("`{s}` is not true or false")),
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a share between 0.0 and 1.0")),
    }
}

fn parse_tolerance(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a relative tolerance in [0, 1)")),
    }
}

fn parse_identifier(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit());
    if valid { Ok(s.to_string()) } else { Err(format!("`{s}` is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")) }
}

/// Parses `1d=1h,4d=18h,*=7d`: windows that ended at most 1 day before the build live 1 hour, at
/// most 4 days 18 hours, older ones 7 days.
pub fn parse_expiry_bands(s: &str) -> Result<ExpiryBands, String> {
    let mut bands = Vec::new();
    let mut otherwise = None;
    for part in s.split(',').map(str::trim) {
        let (age, life) =
            part.split_once('=').ok_or_else(|| format!("`{part}` is not AGE=LIFETIME (e.g. 1d=1h or *=7d)"))?;
        let life = parse_duration(life.trim())?;
        if age.trim() == "*" {
            otherwise = Some(life);
        } else {
            bands.push((parse_duration(age.trim())?, life));
        }
    }
    bands.sort_by_key(|(age, _)| *age);
    let otherwise = otherwise.ok_or_else(|| "a final band `*=LIFETIME` is required".to_string())?;
    Ok(ExpiryBands { bands, otherwise })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&'static str, &str)]) -> SettingsArgs {
        let mut a = SettingsArgs::default();
        for (k, v) in pairs {
            a.set(k, *v);
        }
        a
    }

    #[test]
    fn defaults_load() {
        let c = Config::load(&SettingsArgs::default(), None).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8124");
        assert_eq!(c.mode, Mode::Rewrite);
        assert_eq!(c.seal_after, Duration::from_secs(7200));
        assert_eq!(c.clickhouse_url, c.upstream);
    }

    #[test]
    fn file_then_flags_take_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\nmax_body_bytes = 1024\nmode = \"off\"\n").unwrap();
        let c = Config::load(&args(&[("mode", "shadow")]), Some(&path)).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.max_body_bytes, 1024);
        assert_eq!(c.mode, Mode::Shadow);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::load(&args(&[("seal_after", "soon")]), None).unwrap_err().to_string();
        assert!(err.contains("`seal_after`") && err.contains("PREAGG_SEAL_AFTER"), "{err}");
        let err = Config::load(&args(&[("upstream", "ftp://x")]), None).unwrap_err().to_string();
        assert!(err.contains("`upstream`"), "{err}");
        // No time at all would fail every write that has to wait.
        let err = Config::load(&args(&[("client_send_timeout", "0s")]), None).unwrap_err().to_string();
        assert!(err.contains("`client_send_timeout`") && err.contains("no time at all"), "{err}");
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listne = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::load(&SettingsArgs::default(), Some(&path)).unwrap_err().to_string();
        assert!(err.contains("unknown key `listne`"), "{err}");
    }

    #[test]
    fn a_tls_ca_file_that_does_not_load_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorities.pem");
        std::fs::write(&path, "no certificate here\n").unwrap();
        let err = Config::load(&args(&[("tls_ca_file", path.to_str().unwrap())]), None).unwrap_err().to_string();
        assert!(err.contains("`tls_ca_file`") && err.contains("no PEM certificate"), "{err}");
        let c = Config::load(&args(&[]), None).unwrap();
        assert!(c.redacted_lines().contains(&"tls_ca_file = web roots".to_string()));
    }

    #[test]
    fn the_listener_certificate_needs_both_files_that_belong_together() {
        let dir = tempfile::tempdir().unwrap();
        let text = |path: std::path::PathBuf| path.to_str().unwrap().to_string();
        let (cert, key) = crate::http::tls_listener::self_signed(dir.path(), "one");
        let (_, other_key) = crate::http::tls_listener::self_signed(dir.path(), "other");
        let (cert, key, other_key) = (text(cert), text(key), text(other_key));

        let c = Config::load(&args(&[("tls_cert_file", &cert), ("tls_key_file", &key)]), None).unwrap();
        assert!(c.listen_tls.is_some());
        assert!(c.redacted_lines().contains(&format!("tls_cert_file = {cert} (1 certificate)")));
        assert!(c.redacted_lines().contains(&format!("tls_key_file = {key}")));

        let err = Config::load(&args(&[("tls_cert_file", &cert)]), None).unwrap_err().to_string();
        assert!(err.contains("`tls_key_file`") && err.contains("required with `tls_cert_file`"), "{err}");
        let err = Config::load(&args(&[("tls_key_file", &key)]), None).unwrap_err().to_string();
        assert!(err.contains("`tls_cert_file`") && err.contains("required with `tls_key_file`"), "{err}");
        let err = Config::load(&args(&[("tls_cert_file", &cert), ("tls_key_file", &other_key)]), None).unwrap_err();
        assert!(err.to_string().contains("`tls_key_file`"), "the key is blamed: {err}");
        let err = Config::load(&args(&[("tls_cert_file", &key), ("tls_key_file", &key)]), None).unwrap_err();
        assert!(err.to_string().contains("`tls_cert_file`"), "the certificate is blamed: {err}");

        let c = Config::load(&args(&[]), None).unwrap();
        assert!(c.listen_tls.is_none());
        assert!(c.redacted_lines().contains(&"tls_cert_file = (none)".to_string()));
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Config::load(
            &args(&[
                ("clickhouse_password", "hunter2"),
                ("admin_token", "tok3n"),
                ("store", "postgres://u:pw@localhost/db"),
            ]),
            None,
        )
        .unwrap();
        let text = c.redacted_lines().join("\n");
        for secret in ["hunter2", "tok3n", ":pw@"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        let err = Config::load(&args(&[("upstream", "http://u:p@localhost:8123")]), None).unwrap_err();
        assert!(err.to_string().contains("credentials do not belong"), "{err}");
    }

    #[test]
    fn expiry_bands_pick_the_first_band_that_fits() {
        let b = parse_expiry_bands("4d=18h, 1d=1h, *=7d").unwrap();
        assert_eq!(b.lifetime(Duration::from_secs(3600)), Duration::from_secs(3600));
        assert_eq!(b.lifetime(Duration::from_secs(2 * 86400)), Duration::from_secs(18 * 3600));
        assert_eq!(b.lifetime(Duration::from_secs(9 * 86400)), Duration::from_secs(7 * 86400));
        assert!(parse_expiry_bands("1d=1h").is_err());
    }
}
