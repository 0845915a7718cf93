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

/// Declares every configuration key once, with its type, default, help and how its value is
/// read; from that one list come [`KEYS`] (the flags, `PREAGG_*` variables, TOML keys and
/// documentation), the fields of [`Config`], reading them, and [`Config::redacted_lines`].
macro_rules! keys {
    ($(#[doc = $help:literal] $name:ident: $ty:ty = $default:expr, $read:expr;)+) => {
        /// Every configuration key the proxy knows, in documentation order.
        pub const KEYS: &[KeySpec] = &[$(KeySpec {
            name: stringify!($name),
            default: $default,
            help: doc_line($help),
            secret: <$ty as Shown>::SECRET,
        }),+];

        /// The effective, typed configuration: one field per key, named as the key.
        #[derive(Debug, Clone)]
        pub struct Config {
            $(#[doc = $help] pub $name: $ty,)+
        }

        impl Config {
            fn from_merged(merged: &Merged) -> Result<Config, ConfigError> {
                Ok(Config { $($name: ($read)(merged, stringify!($name))?,)+ })
            }

            /// The effective configuration as `key = value` lines, credentials redacted.
            pub fn redacted_lines(&self) -> Vec<String> {
                vec![$(format!("{} = {}", stringify!($name), self.$name.shown()),)+]
            }
        }
    };
}

/// A doc comment's text without the space `///` leaves before it.
const fn doc_line(text: &'static str) -> &'static str {
    match text.as_bytes() {
        [b' ', ..] => text.split_at(1).1,
        _ => text,
    }
}

keys! {
    /// Address the proxy listens on for ClickHouse HTTP clients
    listen: SocketAddr = Some("127.0.0.1:8124"), required(parse_addr);
    /// PEM certificate chain (server certificate first): with tls_key_file, `listen` speaks HTTPS only
    tls_cert_file: Option<ListenerCert> = None, listener_cert;
    /// PEM private key of tls_cert_file (PKCS#8, PKCS#1 or SEC1)
    tls_key_file: Option<PathBuf> = None, optional(parse_path);
    /// Longest a client may take none of an answer before its connection is dropped (nginx's send_timeout)
    client_send_timeout: Duration = Some("60s"), required(parse_positive_duration);
    /// Longest a client may send none of a query body the proxy reads before it gets 400 (ClickHouse's http_receive_timeout)
    client_receive_timeout: Duration = Some("30s"), required(parse_positive_duration);
    /// ClickHouse HTTP endpoint queries are forwarded to
    upstream: Endpoint = Some("http://127.0.0.1:8123"), required(parse_endpoint);
    /// Job store: sqlite://PATH (embedded default) or postgres://...
    store: StoreUrl = Some("sqlite://preagg-jobs.db"), required(parse_store);
    /// Longest a query waits for the job store; after a failure the store is left alone 5s
    store_timeout: Duration = Some("1s"), required(parse_duration);
    /// Directory of rule files (*.toml), loaded at start
    rules: PathBuf = Some("rules"), required(parse_path);
    /// rewrite (serve from preaggregates), shadow (compare, always answer with the original) or off
    mode: Mode = Some("rewrite"), required(parse_enum);
    /// Log line format: text or json
    log_format: LogFormat = Some("text"), required(parse_enum);
    /// tracing filter directives, e.g. info or preagg_proxy=debug
    log_filter: String = Some("info"), required(parse_text);
    /// Largest request body read as query text; larger non-INSERT bodies get 413
    max_body_bytes: usize = Some("16777216"), required(parse_positive);
    /// Upstream TCP connect timeout (502 when exceeded)
    connect_timeout: Duration = Some("5s"), required(parse_duration);
    /// Time allowed for the upstream response headers (504 when exceeded)
    upstream_timeout: Duration = Some("600s"), required(parse_duration);
    /// On SIGTERM/SIGINT, how long in-flight requests may drain
    shutdown_grace: Duration = Some("30s"), required(parse_duration);
    /// Threads serving clients, each with its own event loop and upstream pool (default: one per CPU)
    workers: usize = None, workers;
    /// ClickHouse HTTP endpoint for the proxy's own statements (default: upstream)
    clickhouse_url: Option<Endpoint> = None, optional(parse_endpoint);
    /// PEM file of the authorities that https upstream and clickhouse_url certificates must chain to (default: the web's roots)
    tls_ca_file: ClientTls = None, client_tls;
    /// User for the proxy's own statements (DDL, builds)
    clickhouse_user: String = Some("default"), required(parse_text);
    /// Password for the proxy's own statements
    clickhouse_password: Secret = None, secret;
    /// Database that holds the preaggregated tables
    preagg_database: String = Some("default"), required(parse_identifier);
    /// ClickHouse cluster name: ON CLUSTER DDL and a Distributed table over local ones
    cluster: Option<String> = None, optional(parse_identifier);
    /// A window is built only once its end is this much older than now; with `exact_under_change`, rows that land in it later are read again anyway, so this only bounds how often recent windows are rebuilt
    seal_after: Duration = Some("5m"), required(parse_duration);
    /// Jobs expiring within this buffer are not served (rows must outlive the queries reading them); shorter than the shortest lifetime of `expiry_bands`
    expiry_buffer: Duration = Some("10m"), required(parse_duration);
    /// Job lifetime by how soon after its window's end it was built; with `exact_under_change` a storage and cost setting (answers are exact at any age; a rebuilt window leaves fewer late rows to read again)
    expiry_bands: ExpiryBands = Some("1d=1h,4d=18h,*=7d"), required(parse_expiry_bands);
    /// background (first query answered by the original) or wait (first query waits for the build)
    build: BuildPolicy = Some("background"), required(parse_enum);
    /// With build=wait: longest a query waits for its windows
    build_wait_timeout: Duration = Some("30s"), required(parse_duration);
    /// Longest a single build statement may run
    build_timeout: Duration = Some("15m"), required(parse_duration);
    /// A pending job whose lease is older than this is taken over by another proxy
    lease_duration: Duration = Some("2m"), required(parse_duration);
    /// After a failed build, how long its windows are left alone before a query retries them
    build_retry_after: Duration = Some("1m"), required(parse_duration);
    /// Builds running at once in this process
    max_concurrent_builds: usize = Some("2"), required(parse_positive);
    /// Builds waiting for a slot in this process; a query that would queue more passes through (build_queue_full)
    max_queued_builds: usize = Some("32"), required(parse_positive);
    /// Job lookups cached in memory (entries)
    job_cache_capacity: u64 = Some("10000"), required(parse_positive);
    /// How long a cached job lookup is trusted before it is read again
    job_cache_ttl: Duration = Some("30s"), required(parse_duration);
    /// Keep answers exact when the source changes after a build: rows ingested since are read again, joins run at read time, a mutation since fails over to the original (false: every body is stored per entity and windows are served as built until they expire)
    exact_under_change: bool = Some("true"), required(parse_bool);
    /// How long before a build started reading a row still counts as possibly unseen by it: longer than any insert takes to become visible (inserts in flight, replication lag, a Distributed table's send queue)
    ingestion_margin: Duration = Some("5m"), required(parse_duration);
    /// Keep preaggregates per ClickHouse user (the user joins the query hash)
    jobs_per_user: bool = Some("false"), required(parse_bool);
    /// CPU-time budget for analyzing one query; slower analysis passes the query through
    max_parse_time: Duration = Some("50ms"), required(parse_duration);
    /// Share of matching queries compared in shadow mode (0.0 to 1.0)
    shadow_sample_rate: f64 = Some("1.0"), required(parse_share);
    /// Shadow comparisons running at once
    shadow_concurrency: usize = Some("2"), required(parse_positive);
    /// Shadow comparisons waiting; more are dropped and counted
    shadow_queue: usize = Some("64"), required(parse_positive);
    /// Also run the original twice to measure original-vs-original noise
    shadow_noise: bool = Some("false"), required(parse_bool);
    /// Relative tolerance when comparing floats in shadow mode
    shadow_float_tolerance: f64 = Some("1e-9"), required(parse_tolerance);
    /// Longest a shadow comparison may run
    shadow_timeout: Duration = Some("120s"), required(parse_duration);
    /// Mismatch samples kept in the job store
    shadow_samples: usize = Some("100"), required(parse_positive);
    /// Address of the admin API, status page and /metrics
    admin_listen: SocketAddr = Some("127.0.0.1:8125"), required(parse_addr);
    /// Bearer token required by the admin API (unset: no token required)
    admin_token: Secret = None, secret;
}

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
    /// The shortest lifetime any job gets.
    pub fn shortest_lifetime(&self) -> Duration {
        self.bands.iter().map(|(_, life)| *life).chain([self.otherwise]).min().unwrap_or(self.otherwise)
    }

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

/// Merged raw values: key -> (text, source).
struct Merged {
    values: BTreeMap<&'static str, (String, Source)>,
}

impl Merged {
    fn get(&self, key: &'static str) -> Option<(&str, Source)> {
        self.values.get(key).map(|(v, s)| (v.as_str(), *s))
    }

    /// The error for `key`, naming where its value came from.
    fn invalid(&self, key: &'static str, message: String) -> ConfigError {
        let origin = self.get(key).map_or(Source::Default, |(_, source)| source);
        ConfigError::Invalid { key, env: env_name(key), origin, message }
    }
}

/// How a key's value is read from the merged text: a key that always has a value (its default
/// at least), parsed by `parse`.
fn required<T>(parse: impl Fn(&str) -> Result<T, String>) -> impl Fn(&Merged, &'static str) -> Result<T, ConfigError> {
    move |merged, key| {
        let (text, _) = merged.get(key).ok_or_else(|| merged.invalid(key, "a value is required".into()))?;
        parse(text).map_err(|message| merged.invalid(key, message))
    }
}

/// A key that may be unset (or set empty), parsed by `parse` when set.
fn optional<T>(
    parse: impl Fn(&str) -> Result<T, String>,
) -> impl Fn(&Merged, &'static str) -> Result<Option<T>, ConfigError> {
    move |merged, key| match merged.get(key) {
        None | Some(("", _)) => Ok(None),
        Some((text, _)) => parse(text).map(Some).map_err(|message| merged.invalid(key, message)),
    }
}

/// `tls_cert_file`: the listener's certificate, loaded with `tls_key_file` (both or neither).
fn listener_cert(merged: &Merged, _: &'static str) -> Result<Option<ListenerCert>, ConfigError> {
    let cert = optional(parse_path)(merged, "tls_cert_file")?;
    match (cert, optional(parse_path)(merged, "tls_key_file")?) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => ListenerCert::load(&cert, &key).map(Some).map_err(|error| {
            let blamed = match &error {
                TlsError::Key { .. } => "tls_key_file",
                TlsError::Unreadable { path, .. } if *path == key => "tls_key_file",
                _ => "tls_cert_file",
            };
            merged.invalid(blamed, error.to_string())
        }),
        (Some(_), None) => Err(merged.invalid("tls_key_file", "a value is required with `tls_cert_file`".into())),
        (None, Some(_)) => Err(merged.invalid("tls_cert_file", "a value is required with `tls_key_file`".into())),
    }
}

/// `tls_ca_file`: the authorities `https://` endpoints must chain to (default: the web's roots).
fn client_tls(merged: &Merged, key: &'static str) -> Result<ClientTls, ConfigError> {
    let from_file = |s: &str| ClientTls::from_ca_file(Path::new(s)).map_err(|e| e.to_string());
    Ok(optional(from_file)(merged, key)?.unwrap_or_default())
}

/// `workers`: as given, else one per CPU the process may use.
fn workers(merged: &Merged, key: &'static str) -> Result<usize, ConfigError> {
    Ok(optional(parse_positive)(merged, key)?.unwrap_or_else(default_workers))
}

/// A credential key.
fn secret(merged: &Merged, key: &'static str) -> Result<Secret, ConfigError> {
    optional(parse_text)(merged, key).map(Secret)
}

/// How a value appears in [`Config::redacted_lines`]; credentials never appear.
trait Shown {
    /// Whether the value is a credential (its flag hides the environment's value too).
    const SECRET: bool = false;

    /// The value as logged.
    fn shown(&self) -> String;
}

/// Values shown as they print.
macro_rules! shown_by_display {
    ($($ty:ty),+) => {$(impl Shown for $ty {
        fn shown(&self) -> String {
            self.to_string()
        }
    })+};
}

/// Values shown by their `Debug` form (durations, enums).
macro_rules! shown_by_debug {
    ($($ty:ty),+) => {$(impl Shown for $ty {
        fn shown(&self) -> String {
            format!("{self:?}")
        }
    })+};
}

shown_by_display!(SocketAddr, String, usize, u64, bool, f64, ClientTls);
shown_by_debug!(Duration, Mode, LogFormat, BuildPolicy, ExpiryBands);

impl<T: Shown> Shown for Option<T> {
    fn shown(&self) -> String {
        self.as_ref().map_or_else(|| "(none)".to_string(), Shown::shown)
    }
}

impl Shown for PathBuf {
    fn shown(&self) -> String {
        self.display().to_string()
    }
}

impl Shown for Endpoint {
    fn shown(&self) -> String {
        self.redacted()
    }
}

impl Shown for ListenerCert {
    fn shown(&self) -> String {
        self.describe_chain()
    }
}

impl Shown for Secret {
    const SECRET: bool = true;

    fn shown(&self) -> String {
        format!("{self:?}")
    }
}

/// A job store URL; its password is never shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl(String);

impl StoreUrl {
    /// The URL, for connecting.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Shown for StoreUrl {
    fn shown(&self) -> String {
        redact_url_password(&self.0)
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
        let merged = Merged { values };
        let config = Config::from_merged(&merged)?;
        let shortest = config.expiry_bands.shortest_lifetime();
        if config.expiry_buffer >= shortest {
            let message = format!(
                "must be shorter than the shortest job lifetime of expiry_bands ({}): such jobs would be built \
                 and never served",
                humantime::format_duration(shortest)
            );
            return Err(merged.invalid("expiry_buffer", message));
        }
        Ok(config)
    }

    /// The endpoint of the proxy's own statements: `clickhouse_url`, else `upstream`.
    pub fn clickhouse_endpoint(&self) -> &Endpoint {
        self.clickhouse_url.as_ref().unwrap_or(&self.upstream)
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
    T::deserialize(s.into_deserializer()).map_err(|e: serde::de::value::Error| e.to_string())
}

fn parse_text(s: &str) -> Result<String, String> {
    Ok(s.to_string())
}

fn parse_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

fn parse_store(s: &str) -> Result<StoreUrl, String> {
    if s.starts_with("sqlite:") || s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(StoreUrl(s.to_string()))
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
    fn the_shipped_example_file_loads_and_says_the_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("preagg-proxy.example.toml");
        let from_example = Config::load(&SettingsArgs::default(), Some(&example)).unwrap();
        let defaults = Config::load(&SettingsArgs::default(), None).unwrap();
        assert_eq!(from_example.redacted_lines(), defaults.redacted_lines());
    }

    #[test]
    fn help_lines_are_the_doc_comments_without_their_leading_space() {
        let listen = KEYS.iter().find(|k| k.name == "listen").unwrap();
        assert_eq!(listen.help, "Address the proxy listens on for ClickHouse HTTP clients");
        assert!(KEYS.iter().all(|k| !k.help.starts_with(' ') && !k.help.is_empty()));
        assert!(KEYS.iter().filter(|k| k.secret).map(|k| k.name).eq(["clickhouse_password", "admin_token"]));
    }

    #[test]
    fn defaults_load() {
        let c = Config::load(&SettingsArgs::default(), None).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8124");
        assert_eq!(c.mode, Mode::Rewrite);
        assert_eq!(c.seal_after, Duration::from_secs(300));
        assert_eq!(c.clickhouse_endpoint(), &c.upstream);
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
        assert!(c.tls_cert_file.is_some());
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
        assert!(c.tls_cert_file.is_none());
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
    fn an_expiry_buffer_that_outlasts_the_shortest_lifetime_is_refused() {
        // Before 10m was the default, 1h against the 1h of windows built within a day of their
        // end: a running experiment's last day was built on every query and never served.
        let e = Config::load(&args(&[("expiry_buffer", "1h")]), None).unwrap_err().to_string();
        assert!(e.contains("expiry_buffer") && e.contains("never served") && e.contains("1h"), "{e}");
        let ok = Config::load(&args(&[("expiry_buffer", "1h"), ("expiry_bands", "1d=2h,*=7d")]), None).unwrap();
        assert_eq!(ok.expiry_bands.shortest_lifetime(), Duration::from_secs(7200));
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
