//! What a request says beyond its query text that changes what the query computes or whom it
//! runs as: URL settings, the database, and the credentials and roles, each read as ClickHouse's
//! HTTP handler reads them.

use std::collections::BTreeMap;

use base64::Engine as _;
use http::HeaderMap;

use super::request::UrlParams;
use crate::sql::settings;

/// The request context that changes what a query computes, read from the request.
#[derive(Debug, Clone, Default)]
pub struct QueryContext {
    /// Settings given as URL parameters.
    pub url_settings: BTreeMap<String, String>,
    /// The `X-ClickHouse-Database` header, else the first non-empty `database` parameter (as
    /// ClickHouse's HTTP handler picks it); empty for the user's default database.
    pub database: String,
    /// The credentials the request authenticates with; `None` when ClickHouse would take them
    /// from where the proxy cannot (an `Authorization` scheme other than Basic, a client
    /// certificate).
    pub credentials: Option<Credentials>,
}

/// A ClickHouse user and password, and the roles it asks for, as a request gives them. The
/// password is never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub user: String,
    password: String,
    /// The `role` parameters, in order (none: the user's default roles).
    pub roles: Vec<String>,
}

impl Credentials {
    /// The password, for use (never for logging).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The credentials of a request, read as ClickHouse's HTTP handler reads them: the
    /// `X-ClickHouse-User`/`X-ClickHouse-Key` headers when either is set, else a Basic
    /// `Authorization` header unless `user` or `password` parameters are given (they win over it
    /// in current ClickHouse; older releases refuse the mix) or it says `never`, else the first
    /// `user` (default `default`) and `password` parameters; and every `role` parameter.
    fn from_request(params: &UrlParams, headers: &HeaderMap) -> Option<Credentials> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if header("x-clickhouse-ssl-certificate-auth") == "on" {
            return None;
        }
        let roles: Vec<String> = params.pairs().filter(|(name, _)| name == "role").map(|(_, role)| role).collect();
        let (user, key) = (header("x-clickhouse-user"), header("x-clickhouse-key"));
        if !user.is_empty() || !key.is_empty() {
            return Some(Credentials { user: user.to_string(), password: key.to_string(), roles });
        }
        let (param_user, param_password) = (params.get("user"), params.get("password"));
        let authorization = headers.get(http::header::AUTHORIZATION).map(|_| header("authorization"));
        if let Some(authorization) =
            authorization.filter(|a| *a != "never" && param_user.is_none() && param_password.is_none())
        {
            // The scheme is compared as ClickHouse does: case-insensitively.
            let (scheme, encoded) = authorization.split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("basic") {
                return None;
            }
            let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (user, password) = text.split_once(':').unwrap_or((&text, ""));
            return Some(Credentials { user: user.to_string(), password: password.to_string(), roles });
        }
        Some(Credentials {
            user: param_user.unwrap_or_else(|| "default".to_string()),
            password: param_password.unwrap_or_default(),
            roles,
        })
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .field("roles", &self.roles)
            .finish()
    }
}

impl QueryContext {
    /// Reads the context from a request's URL parameters and headers.
    pub fn from_request(params: &UrlParams, headers: &HeaderMap) -> QueryContext {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        QueryContext {
            url_settings: settings::url_settings(params.pairs()),
            database: header("x-clickhouse-database")
                .filter(|database| !database.is_empty())
                .or_else(|| {
                    params.pairs().find(|(name, value)| name == "database" && !value.is_empty()).map(|(_, v)| v)
                })
                .unwrap_or_default(),
            credentials: Credentials::from_request(params, headers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_and_user_are_the_ones_clickhouse_picks() {
        let context = |uri: &str, headers: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
            }
            QueryContext::from_request(&UrlParams::from_uri(&uri.parse().unwrap()), &map)
        };
        assert_eq!(context("/?database=a", &[("x-clickhouse-database", "b")]).database, "b");
        assert_eq!(context("/?database=a", &[("x-clickhouse-database", "")]).database, "a");
        assert_eq!(context("/?database=&database=c&database=d", &[]).database, "c");
        assert_eq!(context("/", &[]).database, "");
        let user = |uri: &str, headers: &[(&str, &str)]| context(uri, headers).credentials.map(|c| c.user);
        // "u:p" and "v:p" in base64.
        assert_eq!(user("/", &[("authorization", "basic dTpw")]).as_deref(), Some("u"));
        assert_eq!(context("/", &[("authorization", "Basic dTpw")]).credentials.unwrap().password(), "p");
        assert_eq!(user("/?user=w&user=x", &[]).as_deref(), Some("w"));
        assert_eq!(user("/", &[]).as_deref(), Some("default"));
        assert_eq!(user("/", &[("x-clickhouse-user", "v"), ("authorization", "Basic djpw")]).as_deref(), Some("v"));
        assert_eq!(user("/", &[("authorization", "Bearer dTpw")]), None);
        assert_eq!(user("/", &[("x-clickhouse-ssl-certificate-auth", "on"), ("x-clickhouse-user", "v")]), None);
        assert_eq!(user("/?user=w", &[("authorization", "Basic dTpw")]).as_deref(), Some("w"));
        assert_eq!(user("/", &[("authorization", "never")]).as_deref(), Some("default"));
        // A quota key alone is not a login: the Basic user stands.
        assert_eq!(user("/", &[("x-clickhouse-quota", "k"), ("authorization", "Basic dTpw")]).as_deref(), Some("u"));
        let roles = context("/?role=a&user=u&role=b", &[]).credentials.unwrap().roles;
        assert_eq!(roles, ["a", "b"]);
        let shown = format!("{:?}", context("/?user=u&password=s3cret", &[]));
        assert!(shown.contains("\"u\"") && !shown.contains("s3cret"), "{shown}");
    }
}
