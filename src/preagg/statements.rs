//! The proxy's own statements to ClickHouse (DDL, DESCRIBE, builds, confirmations), through the
//! official `clickhouse` crate with the proxy's own credentials.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hyper_util::rt::TokioExecutor;

use crate::clickhouse_http::context::Credentials;
use crate::config::Config;
use crate::sql::quote;
use crate::sql::rule::Rule;

/// Failures of the proxy's own statements.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    /// ClickHouse answered with an error or could not be reached.
    #[error("clickhouse: {0}")]
    Client(#[from] clickhouse::error::Error),
    /// The statement took longer than allowed.
    #[error("clickhouse: statement timed out after {0:?}")]
    Timeout(Duration),
    /// An answer that does not parse.
    #[error("clickhouse: unexpected answer: {0}")]
    Unexpected(String),
}

/// Cluster layout of the preaggregate table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Database of the tables.
    pub database: String,
    /// Cluster name in cluster mode.
    pub cluster: Option<String>,
}

/// The row key of a rule's table: a job's rows are one per entity, or one per identity (the
/// entity column empty), and per value of the rule's group keys (a nullable key as whether it is
/// NULL and its value: a sort key must not be nullable).
fn row_key(rule: &Rule) -> Vec<String> {
    let mut key: Vec<String> = std::iter::once(&rule.target.entity)
        .chain(rule.source.identity_columns.iter().map(|c| &c.name))
        .map(|name| quote::identifier(name))
        .collect();
    for group_key in &rule.keys {
        let name = quote::identifier(&group_key.name);
        if group_key.stored_type.contains("Nullable(") {
            key.push(format!("isNull({name})"));
            key.push(format!("assumeNotNull({name})"));
        } else {
            key.push(name);
        }
    }
    key
}

/// The identity columns as column definitions.
fn identity_definitions(rule: &Rule) -> Vec<String> {
    rule.source.identity_columns.iter().map(|c| format!("{} {}", quote::identifier(&c.name), c.stored_type)).collect()
}

/// The DDL that creates a rule's table if missing: one ReplacingMergeTree table, or in cluster
/// mode a replicated local table on every node plus a Distributed table over them.
pub fn table_ddl(rule: &Rule, layout: &Layout) -> Vec<String> {
    let mut columns = vec![
        "team_id Int64".to_string(),
        "job_id String".to_string(),
        format!("{} String", quote::identifier(&rule.target.entity)),
    ];
    columns.extend(identity_definitions(rule));
    columns.extend(rule.keys.iter().map(|k| format!("{} {}", quote::identifier(&k.name), k.stored_type)));
    columns.extend(rule.columns.iter().map(|c| format!("{} {}", quote::identifier(&c.name), c.stored_type)));
    columns.push("computed_at DateTime64(6, 'UTC')".to_string());
    columns.push("expires_at DateTime64(6, 'UTC')".to_string());
    let key = row_key(rule).join(", ");
    let order_by = format!("ORDER BY (team_id, job_id, {key})");
    let ttl = "TTL toDateTime(expires_at)";
    let table = quote::qualified(&layout.database, &rule.target.table);
    match &layout.cluster {
        None => vec![format!(
            "CREATE TABLE IF NOT EXISTS {table} ({}) ENGINE = ReplacingMergeTree(computed_at) {order_by} {ttl}",
            columns.join(", ")
        )],
        Some(cluster) => {
            let local_name = format!("{}_local", rule.target.table);
            let local = quote::qualified(&layout.database, &local_name);
            let zk_path = format!("/clickhouse/tables/{{shard}}/{}/{}", layout.database, local_name);
            vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {local} ON CLUSTER {} ({}) ENGINE = ReplicatedReplacingMergeTree({}, \
                     '{{replica}}', computed_at) {order_by} {ttl}",
                    quote::identifier(cluster),
                    columns.join(", "),
                    quote::string(&zk_path)
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {table} ON CLUSTER {} AS {local} ENGINE = Distributed({}, {}, {}, \
                     cityHash64(job_id, {key}))",
                    quote::identifier(cluster),
                    quote::string(cluster),
                    quote::string(&layout.database),
                    quote::string(&local_name),
                ),
            ]
        }
    }
}

/// The DDL that gives a table created by an earlier version (its columns are `present`) the
/// columns the rule has since gained: identity columns join the sort key in the same statement,
/// as ClickHouse requires; other columns are only added. Empty when nothing is missing.
pub fn upgrade_ddl(rule: &Rule, layout: &Layout, present: &[String]) -> Vec<String> {
    let add = |name: &str, ty: &str| format!("ADD COLUMN IF NOT EXISTS {} {ty}", quote::identifier(name));
    // Columns of the sort key: identity columns and group keys.
    let identity: Vec<String> = rule
        .source
        .identity_columns
        .iter()
        .map(|c| (&c.name, &c.stored_type))
        .chain(rule.keys.iter().map(|k| (&k.name, &k.stored_type)))
        .filter(|(name, _)| !present.contains(name))
        .map(|(name, ty)| add(name, ty))
        .collect();
    let mut adds = identity.clone();
    adds.extend(rule.columns.iter().filter(|c| !present.contains(&c.name)).map(|c| add(&c.name, &c.stored_type)));
    if adds.is_empty() {
        return Vec::new();
    }
    let key = row_key(rule).join(", ");
    let sort_key =
        if identity.is_empty() { String::new() } else { format!(", MODIFY ORDER BY (team_id, job_id, {key})") };
    let adds = adds.join(", ");
    let table = quote::qualified(&layout.database, &rule.target.table);
    match &layout.cluster {
        None => vec![format!("ALTER TABLE {table} {adds}{sort_key}")],
        Some(cluster) => {
            let local = quote::qualified(&layout.database, &format!("{}_local", rule.target.table));
            let on = quote::identifier(cluster);
            vec![
                format!("ALTER TABLE {local} ON CLUSTER {on} {adds}{sort_key}"),
                format!("ALTER TABLE {table} ON CLUSTER {on} {adds}"),
            ]
        }
    }
}

/// Settings that make a cluster build visible to the next read: the INSERT waits until the
/// shards have the rows, and reads and writes go to replicas in the same order.
pub fn cluster_settings(layout: &Layout) -> Vec<(&'static str, &'static str)> {
    if layout.cluster.is_some() {
        vec![("insert_distributed_sync", "1"), ("load_balancing", "in_order")]
    } else {
        Vec::new()
    }
}

/// The per-request context a build runs in: the client's database and settings, and the client's
/// credentials when builds run as the client.
#[derive(Debug, Clone, Default)]
pub struct StatementContext {
    /// Database (empty: the proxy user's default).
    pub database: String,
    /// Settings (URL-parameter form).
    pub settings: BTreeMap<String, String>,
    /// The user to run as (`None`: the proxy's own user).
    pub credentials: Option<Credentials>,
}

/// How long an idle connection of the proxy's own statements is kept: less than ClickHouse's
/// `keep_alive_timeout` (3 s before 23.11, 10 s since), so that the server never closes one
/// first.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A client for the proxy's own statements.
#[derive(Clone)]
pub struct ClickHouse {
    client: clickhouse::Client,
    layout: Layout,
    timeout: Duration,
}

impl ClickHouse {
    /// A client with the proxy's credentials from the configuration.
    pub fn new(config: &Config) -> ClickHouse {
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(config.tls_ca_file.connector(config.connect_timeout));
        let mut client = clickhouse::Client::with_http_client(http)
            .with_url(config.clickhouse_endpoint().base_url())
            .with_user(&config.clickhouse_user)
            // The proxy's statements carry little data; plain HTTP works with every server.
            .with_compression(clickhouse::Compression::None)
            .with_validation(false);
        if let Some(password) = config.clickhouse_password.expose() {
            client = client.with_password(password);
        }
        ClickHouse {
            client,
            layout: Layout { database: config.preagg_database.clone(), cluster: config.cluster.clone() },
            timeout: config.build_timeout,
        }
    }

    /// The table layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    async fn bounded<T>(&self, f: impl Future<Output = clickhouse::error::Result<T>>) -> Result<T, ClickHouseError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ClickHouseError::Timeout(self.timeout)),
        }
    }

    fn query(&self, sql: &str, context: &StatementContext) -> clickhouse::query::Query {
        let mut query = match &context.credentials {
            Some(credentials) => {
                let client = self.client.clone().with_user(&credentials.user).with_password(credentials.password());
                let client = if credentials.roles.is_empty() { client } else { client.with_roles(&credentials.roles) };
                client.query_raw(sql)
            }
            None => self.client.query_raw(sql),
        };
        if !context.database.is_empty() {
            query = query.with_setting("database", context.database.clone());
        }
        for (name, value) in &context.settings {
            query = query.with_setting(name.clone(), value.clone());
        }
        for (name, value) in cluster_settings(&self.layout) {
            query = query.with_setting(name, value);
        }
        query.with_setting("max_execution_time", self.timeout.as_secs().max(1).to_string())
    }

    /// Creates a rule's table(s) if missing, and gives a table of an earlier version the columns
    /// it lacks.
    pub async fn ensure_table(&self, rule: &Rule) -> Result<(), ClickHouseError> {
        for ddl in table_ddl(rule, &self.layout) {
            self.bounded(self.client.query_raw(&ddl).execute()).await?;
        }
        let local = match &self.layout.cluster {
            Some(_) => format!("{}_local", rule.target.table),
            None => rule.target.table.clone(),
        };
        let sql = format!(
            "SELECT name FROM system.columns WHERE database = {} AND table = {}",
            quote::string(&self.layout.database),
            quote::string(&local)
        );
        let mut cursor = self.client.query_raw(&sql).fetch_bytes("TabSeparated")?;
        let bytes = self.bounded(cursor.collect()).await?;
        let present: Vec<String> = String::from_utf8_lossy(&bytes).lines().map(unescape_tsv).collect();
        for ddl in upgrade_ddl(rule, &self.layout, &present) {
            self.bounded(self.client.query_raw(&ddl).execute()).await?;
        }
        Ok(())
    }

    /// Answers `SELECT 1`.
    pub async fn ping(&self) -> Result<(), ClickHouseError> {
        self.bounded(self.client.query_raw("SELECT 1").execute()).await
    }

    /// Column names and types from a `DESCRIBE TABLE (...)` statement.
    pub async fn describe(
        &self,
        sql: &str,
        context: &StatementContext,
    ) -> Result<Vec<(String, String)>, ClickHouseError> {
        let mut cursor = self.query(sql, context).fetch_bytes("TabSeparated")?;
        let bytes = self.bounded(cursor.collect()).await?;
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|_| ClickHouseError::Unexpected("DESCRIBE output is not UTF-8".into()))?;
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                let mut fields = line.split('\t').map(unescape_tsv);
                match (fields.next(), fields.next()) {
                    (Some(name), Some(ty)) => Ok((name, ty)),
                    _ => Err(ClickHouseError::Unexpected(format!("DESCRIBE line `{line}`"))),
                }
            })
            .collect()
    }

    /// Runs a build INSERT. A build never writes one (job, entity) twice (they are its GROUP BY
    /// key), so the ReplacingMergeTree's sort-and-deduplicate of every inserted block is skipped.
    pub async fn insert(&self, sql: &str, context: &StatementContext) -> Result<(), ClickHouseError> {
        self.bounded(self.query(sql, context).with_setting("optimize_on_insert", "0").execute()).await
    }

    /// ClickHouse's clock now, in microseconds since the Unix epoch.
    pub async fn now_micros(&self) -> Result<i64, ClickHouseError> {
        let mut cursor = self
            .query("SELECT toUnixTimestamp64Micro(now64(6))", &StatementContext::default())
            .fetch_bytes("TabSeparated")?;
        let bytes = self.bounded(cursor.collect()).await?;
        let text = String::from_utf8_lossy(&bytes);
        text.trim().parse().map_err(|_| ClickHouseError::Unexpected(text.to_string()))
    }

    /// Rows stored per job id (jobs with no rows are absent).
    pub async fn count_by_job(
        &self,
        rule: &Rule,
        team_id: i64,
        job_ids: &[String],
    ) -> Result<HashMap<String, u64>, ClickHouseError> {
        let ids: Vec<String> = job_ids.iter().map(|j| quote::string(j)).collect();
        let sql = format!(
            "SELECT job_id, count() FROM {} WHERE team_id = {team_id} AND job_id IN ({}) GROUP BY job_id",
            quote::qualified(&self.layout.database, &rule.target.table),
            ids.join(", ")
        );
        let mut cursor = self.query(&sql, &StatementContext::default()).fetch_bytes("TabSeparated")?;
        let bytes = self.bounded(cursor.collect()).await?;
        let text = String::from_utf8_lossy(&bytes);
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                let (job, count) =
                    line.split_once('\t').ok_or_else(|| ClickHouseError::Unexpected(line.to_string()))?;
                let count = count.parse().map_err(|_| ClickHouseError::Unexpected(line.to_string()))?;
                Ok((unescape_tsv(job), count))
            })
            .collect()
    }
}

/// Undoes TabSeparated escaping.
fn unescape_tsv(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::load_dir;

    fn rule() -> Rule {
        load_dir(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/rules"))).unwrap().remove(0)
    }

    #[test]
    fn single_node_ddl() {
        let layout = Layout { database: "default".into(), cluster: None };
        insta::assert_snapshot!(table_ddl(&rule(), &layout).join(";\n"));
    }

    #[test]
    fn cluster_ddl() {
        let layout = Layout { database: "analytics".into(), cluster: Some("posthog".into()) };
        insta::assert_snapshot!(table_ddl(&rule(), &layout).join(";\n"));
        assert_eq!(cluster_settings(&layout).len(), 2);
    }

    #[test]
    fn a_table_of_an_earlier_version_is_upgraded_once() {
        let layout = Layout { database: "default".into(), cluster: None };
        let rule = rule();
        let old: Vec<String> = ["team_id", "job_id", "entity_id", "variant"].map(String::from).into();
        insta::assert_snapshot!(upgrade_ddl(&rule, &layout, &old).join(";\n"));
        let sort_key = rule.source.identity_columns.iter().map(|c| c.name.clone());
        let sort_key = sort_key.chain(rule.keys.iter().map(|k| k.name.clone()));
        let mut new: Vec<String> = old.iter().cloned().chain(sort_key).collect();
        let columns_only = upgrade_ddl(&rule, &layout, &new).join(";\n");
        assert!(columns_only.contains("breakdown_value_1") && !columns_only.contains("ORDER BY"), "{columns_only}");
        new.extend(rule.columns.iter().map(|c| c.name.clone()));
        assert!(upgrade_ddl(&rule, &layout, &new).is_empty());
    }

    #[test]
    fn tsv_unescapes() {
        assert_eq!(unescape_tsv(r"a\tb\\c\'d"), "a\tb\\c'd");
    }
}
