//! SIGHUP reloads the configuration file and the rules while connections stay up.

mod common;

use std::time::Duration;

use common::relay::{Mode, Relay};
use common::{ChServer, ProxyProcess, client, root, wait_for};

/// An experiment query whose range is in the future: analyzed and matched, never built.
const FUTURE_QUERY: &str = "SELECT events.person_id AS entity_id, min(events.timestamp) AS first_exposure_time \
     FROM events WHERE events.team_id = 1 AND events.event = '$feature_flag_called' \
     AND events.timestamp >= '2099-01-01 00:00:00' AND events.timestamp < '2099-01-05 00:00:00' GROUP BY entity_id";

async fn preagg_of(url: &str, body: &str) -> (u16, String) {
    let response = client().post(url).body(body.to_string()).send().await.unwrap();
    let status = response.status().as_u16();
    let preagg = response.headers().get("x-preagg").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, preagg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rules_and_settings_without_dropping_connections() {
    let server = ChServer::start();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::copy(root().join("rules/experiment_exposures.toml"), rules.join("experiment_exposures.toml")).unwrap();
    let config = dir.path().join("proxy.toml");
    let write_config = |max_body: u64, extra: &str| {
        std::fs::write(
            &config,
            format!("rules = \"{}\"\nmax_body_bytes = {max_body}\nseal_after = \"2h\"\n{extra}", rules.display()),
        )
        .unwrap();
    };
    write_config(1_000_000, "");
    let proxy = ProxyProcess::start(&server.url(), &[("config", config.to_str().unwrap())]);
    proxy.wait_engine_ready();
    let (_, before) = preagg_of(&proxy.url(), FUTURE_QUERY).await;
    assert_eq!(before, "passthrough reason=no_windows_ready");

    // A slow query in flight, and a kept-alive client, across the reload.
    let keep_alive = client();
    let slow_url = proxy.url();
    let slow = tokio::spawn(async move { preagg_of(&slow_url, "SELECT sleep(1.5)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::remove_file(rules.join("experiment_exposures.toml")).unwrap();
    write_config(1_000, "shadow_queue = 7\n");
    proxy.signal("HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        proxy.log_lines().iter().any(|l| l["message"] == "configuration reloaded").then_some(())
    });
    assert_eq!(slow.await.unwrap().0, 200, "the in-flight query finished");
    let restart_warning =
        proxy.log_lines().into_iter().find(|l| l["message"] == "these keys only take effect after a restart");
    assert!(restart_warning.is_some_and(|l| l.to_string().contains("shadow_queue")));

    let (_, after) = preagg_of(&proxy.url(), FUTURE_QUERY).await;
    assert_eq!(after, "passthrough reason=not_experiment_query", "the rule is gone");
    let response = keep_alive.post(proxy.url()).body(format!("SELECT '{}'", "x".repeat(2_000))).send().await.unwrap();
    assert_eq!(response.status(), 413, "the new body cap applies");

    // A broken file is refused and the running configuration stays.
    std::fs::write(&config, "max_body_bytes = \"lots\"\n").unwrap();
    proxy.signal("HUP");
    wait_for("the refused reload", Duration::from_secs(10), || {
        proxy
            .log_lines()
            .iter()
            .any(|l| l["message"] == "reload failed; keeping the running configuration")
            .then_some(())
    });
    let (status, _) = preagg_of(&proxy.url(), "SELECT 1").await;
    assert_eq!(status, 200);
}

/// A reload that comes while the job store is unreachable (the engine not connected yet) is not
/// lost: once the engine connects, it runs with the reloaded rules, not those of the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_before_the_engine_is_ready_applies_once_it_is() {
    let server = ChServer::start();
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    relay.set(Mode::Drop);
    let store = common::postgres_url().replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::copy(root().join("rules/experiment_exposures.toml"), rules.join("experiment_exposures.toml")).unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, format!("rules = \"{}\"\n", rules.display())).unwrap();
    let proxy = ProxyProcess::start(&server.url(), &[("config", config.to_str().unwrap()), ("store", &store)]);
    wait_for("the engine to fail to connect", Duration::from_secs(10), || {
        proxy.log_lines().iter().any(|l| l["message"] == "engine not ready; queries pass through").then_some(())
    });
    std::fs::remove_file(rules.join("experiment_exposures.toml")).unwrap();
    proxy.signal("HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        proxy.log_lines().iter().any(|l| l["message"] == "configuration reloaded").then_some(())
    });
    relay.set(Mode::Forward);
    proxy.wait_engine_ready();
    let (_, preagg) = preagg_of(&proxy.url(), FUTURE_QUERY).await;
    assert_eq!(preagg, "passthrough reason=not_experiment_query", "the rule removed by the reload is gone");
}
