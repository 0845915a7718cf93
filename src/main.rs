//! The `preagg-proxy` command line.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use preagg_proxy::admin::JobView;
use preagg_proxy::clickhouse_http::context::QueryContext;
use preagg_proxy::config::{Config, SettingsArgs};
use preagg_proxy::preagg::store::{JobFilter, Store};
use preagg_proxy::{app, explain, preagg, sql};

/// A transparent ClickHouse HTTP proxy that serves experiment exposure subqueries from
/// preaggregated windows.
#[derive(Parser)]
#[command(name = "preagg-proxy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// TOML file with configuration keys (flags and PREAGG_* variables override it).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Show what the proxy would do with one query (no IO; every sealed window assumed built).
    Explain {
        /// File holding the query; `-` or nothing reads standard input.
        file: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// "Now" for sealing windows, e.g. 2026-01-20T00:00:00Z (default: the current time).
        #[arg(long)]
        now: Option<String>,
        /// TOML file with configuration keys.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// List or invalidate jobs in the job store.
    Jobs {
        #[command(subcommand)]
        action: JobsAction,
        /// TOML file with configuration keys.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Build the windows of a query before the first viewer asks (needs ClickHouse and the store).
    Warm {
        /// Files holding queries (`-` reads standard input).
        files: Vec<PathBuf>,
        /// Database the queries run in (their unqualified tables resolve there).
        #[arg(long, default_value = "")]
        database: String,
        /// TOML file with configuration keys.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
}

#[derive(Subcommand)]
enum JobsAction {
    /// Print jobs as JSON lines.
    List {
        /// Only this team.
        #[arg(long)]
        team: Option<i64>,
        /// Only this query hash.
        #[arg(long)]
        hash: Option<String>,
        /// Most jobs printed.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
    /// Expire ready jobs now so they are rebuilt.
    Invalidate {
        /// Team whose jobs to invalidate.
        #[arg(long)]
        team: i64,
        /// Only this query hash.
        #[arg(long)]
        hash: Option<String>,
        /// Only windows ending after this instant (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Only windows starting before this instant (RFC 3339).
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, settings } => serve(config, settings),
        Command::Explain { file, format, now, config, settings } => run_explain(file, format, now, config, settings),
        Command::Jobs { action, config, settings } => run_jobs(action, config, settings),
        Command::Warm { files, database, config, settings } => run_warm(files, database, config, settings),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("preagg-proxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(file: Option<PathBuf>, settings: SettingsArgs) -> anyhow::Result<()> {
    let config = Config::load(&settings, file.as_deref())?;
    let log = app::init_logging(config.log_format, &config.log_filter);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(app::serve(config, app::ConfigSource { args: settings, file, log }))
}

fn run_explain(
    file: Option<PathBuf>,
    format: Format,
    now: Option<String>,
    config_file: Option<PathBuf>,
    settings: SettingsArgs,
) -> anyhow::Result<()> {
    let config = Config::load(&settings, config_file.as_deref())?;
    let text = match file.as_deref() {
        None => read_stdin()?,
        Some(p) if p.as_os_str() == "-" => read_stdin()?,
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
    };
    let now = match now {
        Some(text) => chrono::DateTime::parse_from_rfc3339(&text)
            .with_context(|| format!("--now `{text}` is not an RFC 3339 timestamp such as 2026-01-20T00:00:00Z"))?
            .timestamp_micros(),
        None => preagg::now_micros(),
    };
    let rules = app::load_rules(&config)?;
    let request = explain::Request {
        text: &text,
        rules: &rules,
        context: sql::Context::default(),
        now,
        seal_after: i64::try_from(config.seal_after.as_micros()).unwrap_or(i64::MAX),
        preagg_database: config.preagg_database.clone(),
        cluster: config.cluster.clone(),
        budget: config.max_parse_time,
        exact_under_change: config.exact_under_change,
        ingestion_margin: config.ingestion_margin,
    };
    let explanation = explain::explain(&request);
    match format {
        Format::Text => print!("{}", explain::render_text(&explanation)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
    }
    Ok(())
}

fn parse_instant(text: &str) -> anyhow::Result<i64> {
    Ok(chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("`{text}` is not an RFC 3339 timestamp such as 2026-01-20T00:00:00Z"))?
        .timestamp_micros())
}

fn run_jobs(action: JobsAction, config_file: Option<PathBuf>, settings: SettingsArgs) -> anyhow::Result<()> {
    let config = Config::load(&settings, config_file.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let store = Store::connect(config.store.as_str(), config.store_timeout).await?;
        match action {
            JobsAction::List { team, hash, limit } => {
                let filter = JobFilter { team_id: team, query_hash: hash, limit };
                for job in store.list(&filter).await? {
                    println!("{}", serde_json::to_string(&JobView::from(job))?);
                }
            }
            JobsAction::Invalidate { team, hash, from, to } => {
                let range = match (from, to) {
                    (None, None) => None,
                    (from, to) => Some((
                        from.as_deref().map(parse_instant).transpose()?.unwrap_or(i64::MIN),
                        to.as_deref().map(parse_instant).transpose()?.unwrap_or(i64::MAX),
                    )),
                };
                let count = store.invalidate(team, hash.as_deref(), range, preagg::now_micros()).await?;
                println!("invalidated {count} job(s)");
            }
        }
        Ok(())
    })
}

fn run_warm(
    files: Vec<PathBuf>,
    database: String,
    config_file: Option<PathBuf>,
    settings: SettingsArgs,
) -> anyhow::Result<()> {
    let config = Config::load(&settings, config_file.as_deref())?;
    app::init_logging(config.log_format, "warn");
    let texts = if files.is_empty() {
        vec![("-".to_string(), read_stdin()?)]
    } else {
        files
            .iter()
            .map(|p| {
                let text = if p.as_os_str() == "-" { read_stdin() } else { Ok(std::fs::read_to_string(p)?) };
                text.map(|t| (p.display().to_string(), t))
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let engine = app::build_engine(&config, app::load_rules(&config)?).await?;
        let bar = indicatif::ProgressBar::new(texts.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let context = QueryContext { database, ..QueryContext::default() };
        let mut failures = 0;
        for (name, text) in texts {
            bar.set_message(name.clone());
            match engine.warm(&context, &text).await {
                // Printed above the bar, and printed at all when the output is not a terminal.
                Ok(built) => {
                    bar.suspend(|| println!("{name}: {} occurrence(s), windows built: {built:?}", built.len()))
                }
                Err(error) => {
                    failures += 1;
                    bar.suspend(|| eprintln!("{name}: {error}"));
                }
            }
            bar.inc(1);
        }
        bar.finish_with_message("done");
        anyhow::ensure!(failures == 0, "{failures} query(ies) could not be warmed");
        Ok(())
    })
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text).context("reading standard input")?;
    Ok(text)
}
