//! Shared helpers: a fresh dev PKI per test, the gateway in-process or as the real binary,
//! and small readers for its logs and admin port.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use civgate::{
    config::DEFAULT_CONFIG,
    server::{self, ConfigSource, Overrides, Running},
};
use tempfile::TempDir;

pub struct Env {
    pub dir: TempDir,
}

impl Env {
    /// A temp directory holding `certs/` from `civgate certs init` and `civgate.toml`.
    pub fn new() -> Self {
        civgate::tls::install_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        civgate::certs::init(&dir.path().join("certs"), false).expect("certs init");
        let env = Self { dir };
        env.write_config(DEFAULT_CONFIG);
        env
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("civgate.toml")
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// Starts the gateway in this process on ephemeral ports.
    pub async fn start(&self) -> Running {
        self.start_with(DEFAULT_CONFIG).await
    }

    pub async fn start_with(&self, text: &str) -> Running {
        server::start(
            ConfigSource::Text {
                text: text.into(),
                base_dir: self.dir.path().to_owned(),
            },
            ephemeral(self.dir.path()),
        )
        .await
        .expect("gateway starts")
    }

    /// Runs the real `civgate serve` binary on ephemeral ports.
    pub fn spawn_binary(&self) -> Gateway {
        self.spawn_binary_on("127.0.0.1:0")
    }

    /// Runs the real `civgate serve` binary with its API on `listen`.
    pub fn spawn_binary_on(&self, listen: &str) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_civgate"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(self.config_path())
            .args(["--listen", listen, "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn civgate");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel::<serde_json::Value>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let mut gw = Gateway {
            child,
            logs: rx,
            api: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
        };
        let line = gw.wait_log("civgate serving");
        gw.api = line["api"].as_str().unwrap().parse().unwrap();
        gw.admin = line["admin"].as_str().unwrap().parse().unwrap();
        gw
    }
}

pub fn ephemeral(dir: &Path) -> Overrides {
    Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(dir.join("data")),
    }
}

/// The real binary, its JSON log lines, and its ports.
pub struct Gateway {
    pub child: Child,
    pub logs: mpsc::Receiver<serde_json::Value>,
    pub api: SocketAddr,
    pub admin: SocketAddr,
}

impl Gateway {
    /// Blocks until a log line whose message contains `needle` (panics after 60 s).
    pub fn wait_log(&mut self, needle: &str) -> serde_json::Value {
        loop {
            let v = self
                .logs
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no log line containing {needle:?}"));
            if v["message"].as_str().is_some_and(|m| m.contains(needle)) {
                return v;
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET a path on the admin port (plain HTTP/1.0).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The reference directory and the gateway in this process, wired together.
pub struct Stack {
    pub directory: civgate::refdb::RunningRefdb,
    pub gateway: Running,
    pub people: Vec<civgate::synth::CitizenRecord>,
}

/// The reference directory alone (tests that start the gateway with their own config).
pub struct Directory {
    pub directory: civgate::refdb::RunningRefdb,
    pub people: Vec<civgate::synth::CitizenRecord>,
}

pub const STACK_CITIZENS: usize = 3_000;
pub const STACK_SEED: u64 = 11;

impl Env {
    pub async fn start_directory(&self) -> Directory {
        let cfg = civgate::config::Config::parse(
            DEFAULT_CONFIG,
            "civgate.toml".into(),
            self.dir.path().to_owned(),
        )
        .unwrap();
        let directory = civgate::refdb::start(
            &cfg,
            civgate::refdb::RefdbOverrides {
                listen: Some("127.0.0.1:0".parse().unwrap()),
                data_dir: Some(self.dir.path().join("refdb")),
                citizens: Some(STACK_CITIZENS),
                seed: Some(STACK_SEED),
            },
        )
        .await
        .expect("directory starts");
        Directory {
            directory,
            people: civgate::synth::Population::new(STACK_SEED, STACK_CITIZENS).collect(),
        }
    }

    pub async fn start_stack(&self) -> Stack {
        let Directory { directory, people } = self.start_directory().await;
        let text = with_upstream_port(DEFAULT_CONFIG, directory.addr.port());
        let gateway = self.start_with(&text).await;
        Stack {
            directory,
            gateway,
            people,
        }
    }
}

pub fn with_upstream_port(text: &str, port: u16) -> String {
    text.replace(
        "https://localhost:7444",
        &format!("https://localhost:{port}"),
    )
}
