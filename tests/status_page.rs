//! The status page in a real browser: headless Chromium (installed by scripts/ensure-chromium.sh
//! when missing; never skipped) renders `GET /admin` of a proxy with ready, expired and raw
//! windows, shadow counters and a mismatch. The screenshot goes to target/status-page.png; with
//! PREAGG_UPDATE_SCREENSHOT=1 (or when it is missing) also to docs/status-page.png for the README.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::equivalence::{exec, form, forms, run, same_rows};
use common::{ChServer, ProxyProcess, client, root};

const TEAM: i64 = 99999;
const FLAG: &str = "test-experiment";
const TOKEN: &str = "page-token";

/// The Chromium binary, installed if missing.
fn chromium() -> String {
    let out = Command::new(root().join("scripts/ensure-chromium.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running scripts/ensure-chromium.sh");
    assert!(out.status.success(), "scripts/ensure-chromium.sh failed: the test needs Chromium");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs headless Chromium on `url` with `action` (`--screenshot=PATH` or `--dump-dom`); returns stdout.
fn headless(chromium: &str, action: &str, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new("timeout")
        .args(["120", chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--window-size=1280,900", action, url])
        .output()
        .expect("running chromium");
    assert!(output.status.success(), "chromium {action} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A decoded PNG: width, height, RGB pixels.
struct Image {
    width: usize,
    height: usize,
    rgb: Vec<[u8; 3]>,
}

/// Decodes an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes).
fn decode_png(bytes: &[u8]) -> Image {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut pos, mut header, mut data) = (8, None, Vec::new());
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let body = &bytes[pos + 8..pos + 8 + len];
        match kind {
            b"IHDR" => header = Some(body.to_vec()),
            b"IDAT" => data.extend_from_slice(body),
            _ => {}
        }
        pos += 12 + len;
    }
    let header = header.expect("IHDR");
    let width = u32::from_be_bytes(header[0..4].try_into().unwrap()) as usize;
    let height = u32::from_be_bytes(header[4..8].try_into().unwrap()) as usize;
    let (depth, color, interlace) = (header[8], header[9], header[12]);
    assert!(depth == 8 && (color == 2 || color == 6) && interlace == 0, "unexpected PNG {depth} {color} {interlace}");
    let channels = if color == 6 { 4 } else { 3 };
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&data[..]), &mut raw).unwrap();
    let stride = width * channels;
    let mut pixels = vec![0u8; stride * height];
    for y in 0..height {
        let filter = raw[y * (stride + 1)];
        let line = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
        for x in 0..stride {
            let a = if x >= channels { pixels[y * stride + x - channels] as i16 } else { 0 };
            let b = if y > 0 { pixels[(y - 1) * stride + x] as i16 } else { 0 };
            let c = if x >= channels && y > 0 { pixels[(y - 1) * stride + x - channels] as i16 } else { 0 };
            let predicted = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                other => panic!("PNG filter {other}"),
            };
            pixels[y * stride + x] = line[x].wrapping_add(predicted as u8);
        }
    }
    let rgb = pixels.chunks(channels).map(|p| [p[0], p[1], p[2]]).collect();
    Image { width, height, rgb }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

fn save(png: &[u8], path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, png).unwrap();
    eprintln!("status page screenshot: {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_in_headless_chromium() {
    let chromium = chromium();
    let server = ChServer::start();
    server.generate(&["--events", "150000", "--seed", "7", "--start", "2026-10-01", "--days", "14"]);
    let database = "status_page";
    exec(&server.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let proxy = ProxyProcess::start(
        &server.url(),
        &[("mode", "shadow"), ("admin_token", TOKEN), ("preagg_database", database)],
    );
    proxy.wait_engine_ready();
    let admin = |path: &str| format!("{}{path}", proxy.admin_url());

    // Two query shapes: one with two separate ranges built (a raw gap between them), part of it
    // invalidated (expired); one shadowed until a stored row is tampered with (a mismatch).
    let forms = forms(TEAM, FLAG);
    let ranges = [
        ("2026-10-01 06:00:00.000000", "2026-10-05 18:00:00.000000"),
        ("2026-10-08 00:00:00.000000", "2026-10-12 12:00:00.000000"),
    ];
    let queries: Vec<String> = ranges.iter().map(|(lo, hi)| forms[0].query(lo, hi)).collect();
    // The infix form reads `events` alone: its rows are per entity, which the tamper below keys on.
    let second = form(TEAM, FLAG, "infix").query("2026-10-02 00:00:00.000000", "2026-10-13 00:00:00.000000");
    for sql in queries.iter().chain([&second]) {
        let response = client().post(admin("/admin/warm")).bearer_auth(TOKEN).body(sql.clone()).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{}", response.text().await.unwrap_or_default());
    }
    for sql in queries.iter().chain([&second]) {
        let direct = run(&server.url(), sql).await;
        let answer = run(&proxy.url(), sql).await;
        same_rows(&direct, &answer).unwrap();
    }
    let table = format!("{database}.experiment_exposures_preaggregated");
    exec(
        &server.url(),
        &format!(
            "ALTER TABLE {table} UPDATE variant = if(variant = 'control', 'test', 'control') WHERE team_id = {TEAM} \
             AND cityHash64(entity_id) % 50 = 0 SETTINGS mutations_sync = 2"
        ),
    );
    let answer = run(&proxy.url(), &second).await;
    assert_eq!(answer.preagg, "passthrough reason=shadow");
    let started = Instant::now();
    loop {
        let shadow: serde_json::Value =
            client().get(admin("/admin/shadow")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
        if shadow["samples"].as_array().is_some_and(|s| !s.is_empty()) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no mismatch: {shadow}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Last, so that no query builds them again: a day of windows expires.
    let invalidate =
        format!("{{\"team_id\": {TEAM}, \"start\": \"2026-10-10T00:00:00Z\", \"end\": \"2026-10-11T00:00:00Z\"}}");
    let response =
        client().post(admin("/admin/jobs/invalidate")).bearer_auth(TOKEN).body(invalidate).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let jobs: serde_json::Value =
        client().get(admin("/admin/jobs?limit=100000")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    let now = chrono::Utc::now().timestamp_micros();
    let mut latest: BTreeMap<(String, i64, i64), &serde_json::Value> = BTreeMap::new();
    for job in jobs["jobs"].as_array().unwrap() {
        let key = (
            job["query_hash"].as_str().unwrap().to_string(),
            job["window"]["start"].as_i64().unwrap(),
            job["window"]["end"].as_i64().unwrap(),
        );
        if latest.get(&key).is_none_or(|j| j["created_at"].as_i64() < job["created_at"].as_i64()) {
            latest.insert(key, job);
        }
    }
    let state = |expired: bool| {
        latest
            .values()
            .filter(|j| j["status"] == "ready" && (j["expires_at"].as_i64().unwrap() <= now) == expired)
            .count()
    };
    let (ready, expired) = (state(false), state(true));
    assert!(ready > 0 && expired > 0, "ready {ready}, expired {expired}");

    // The rendered DOM: one timeline per query hash, a cell per window.
    let url = admin(&format!("/admin?token={TOKEN}"));
    let dom = headless(&chromium, "--dump-dom", &url);
    assert!(dom.contains("<h1>preagg-proxy status</h1>"), "{dom}");
    assert_eq!(dom.matches("<div class=\"timeline\">").count(), 2, "{dom}");
    assert_eq!(dom.matches("<div class=\"ready\"").count(), ready, "a ready cell per ready window");
    assert_eq!(dom.matches("<div class=\"expired\"").count(), expired, "an expired cell per invalidated window");
    assert!(dom.matches("<div class=\"raw\"").count() >= 1, "the gap between the two ranges is read raw");
    assert!(dom.contains("title=\"ready: 2026-10-0"), "cells carry their window");
    assert!(dom.contains("<td>experiment_exposures</td>"), "the shadow table: {dom}");
    assert!(dom.contains("Recent mismatches") && dom.contains("row counts differ") || dom.contains("differs"));

    // The screenshot: the page's colours are on it, not a blank or an error page.
    let shot = target_dir().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    headless(&chromium, &format!("--screenshot={}", shot.display()), &url);
    let png = std::fs::read(&shot).expect("the screenshot was written");
    let image = decode_png(&png);
    assert_eq!((image.width, image.height), (1280, 900));
    let share = |rgb: [u8; 3]| image.rgb.iter().filter(|p| **p == rgb).count() as f64 / image.rgb.len() as f64;
    let (green, grey) = (share([0x2e, 0x9d, 0x4f]), share([0x99, 0xaa, 0xaa]));
    eprintln!("screenshot: {} bytes, ready green {:.2}%, expired grey {:.3}%", png.len(), green * 100.0, grey * 100.0);
    assert!(green > 0.005, "the ready cells are drawn");
    assert!(grey > 0.0, "the expired cells are drawn");
    let docs = root().join("docs/status-page.png");
    if std::env::var_os("PREAGG_UPDATE_SCREENSHOT").is_some() || !docs.exists() {
        save(&png, &docs);
    }
    save(&png, &shot);
}
