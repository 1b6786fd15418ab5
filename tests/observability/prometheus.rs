//! Prometheus's own tools on the exposition: promtool, and a real server
//! scraping ours.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use test_support::{FEED_CAPACITY, TestServer, http_get, user, within};
use user_service::{Config, MemoryStore};

#[tokio::test]
async fn the_exposition_passes_promtool() {
    let server =
        TestServer::start_with_metrics(MemoryStore::new(FEED_CAPACITY), Config::default()).await;
    server.client().await.add_user(user("Ann")).await.unwrap();
    let (status, text) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool (Debian's prometheus package; scripts/install-test-tools.sh installs it)",
        );
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A free port on loopback, for a program that takes one (Prometheus).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_server() {
    let server =
        TestServer::start_with_metrics(MemoryStore::new(FEED_CAPACITY), Config::default()).await;
    let mut client = server.client().await;
    for i in 0..3 {
        client.add_user(user(&format!("p{i}"))).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: user-service\n    static_configs:\n      - targets: ['{}']\n",
            server.metrics_addr.unwrap()
        ),
    )
    .unwrap();
    let web: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "prometheus (Debian's prometheus package; scripts/install-test-tools.sh installs it)",
        );
    let query = "/api/v1/query?query=grpc_server_handled_total%7Bgrpc_method%3D%22AddUser%22%2Cgrpc_code%3D%22OK%22%7D";
    // Scrapes are every second: the figure shows up within a few.
    let value = within("Prometheus to have scraped the server", async {
        loop {
            // Prometheus takes a moment to listen.
            if let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(web),
            )
            .await
            {
                let (status, body) = http_get(web, query).await;
                if status == 200 {
                    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
                    if let Some(value) = reply["data"]["result"][0]["value"][1].as_str() {
                        break value.to_owned();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert_eq!(value, "3");
}
