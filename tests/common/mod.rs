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
    /// `Some`: the journal and audit log live in this PostgreSQL schema instead of SQLite.
    pub store_url: Option<String>,
}

impl Env {
    /// A temp directory holding `certs/` from `civgate certs init` and `civgate.toml`.
    pub fn new() -> Self {
        civgate::tls::install_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        civgate::certs::init(&dir.path().join("certs"), false).expect("certs init");
        let env = Self {
            dir,
            store_url: None,
        };
        env.write_config(DEFAULT_CONFIG);
        env
    }

    /// Like [`Env::new`], with the stores in a fresh PostgreSQL schema; `None` (the test is
    /// skipped, with a line saying why) where PostgreSQL is not reachable, unless
    /// `CIVGATE_REQUIRE_POSTGRES=1`.
    pub async fn postgres(label: &str) -> Option<Self> {
        let url = civgate::store::test_schema(label).await?;
        let mut env = Self::new();
        env.store_url = Some(url);
        Some(env)
    }

    /// Ephemeral ports, a data directory in the temp dir, and this env's store.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            store_url: self.store_url.clone(),
            ..ephemeral(self.dir.path())
        }
    }

    /// A connection of its own to the gateway's SQLite store (`data/civgate.sqlite`).
    pub async fn sqlite(&self) -> sqlx::SqliteConnection {
        use sqlx::Connection;
        let path = self.dir.path().join("data/civgate.sqlite");
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap()
    }

    /// Puts a stored store where this env's gateway will open it: the SQLite file
    /// `sqlite_file` into the data directory, or the PostgreSQL dump `postgres_dump` (its
    /// schema written `__SCHEMA__`) into this env's schema.
    pub async fn restore(&self, sqlite_file: &str, postgres_dump: &str) {
        match &self.store_url {
            None => {
                let data = self.dir.path().join("data");
                std::fs::create_dir_all(&data).unwrap();
                std::fs::copy(sqlite_file, data.join("civgate.sqlite")).unwrap();
            }
            Some(url) => {
                use sqlx::Connection;
                let schema = url.rsplit("search_path%3D").next().unwrap();
                let dump = std::fs::read_to_string(postgres_dump).unwrap();
                let mut c = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(dump.replace("__SCHEMA__", schema)))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
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
            self.overrides(),
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
        self.spawn_command(Command::new(env!("CARGO_BIN_EXE_civgate")), listen)
    }

    /// Runs the real binary with at most `nofile` open files (`ulimit -n`).
    pub fn spawn_binary_with_open_files(&self, nofile: u32) -> Gateway {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\"",))
            .arg(env!("CARGO_BIN_EXE_civgate"));
        self.spawn_command(sh, "127.0.0.1:0")
    }

    fn spawn_command(&self, mut command: Command, listen: &str) -> Gateway {
        let mut child = command
            .args(["--log-format", "json", "serve", "--config"])
            .arg(self.config_path())
            .args(["--listen", listen, "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(
                self.store_url
                    .iter()
                    .flat_map(|u| ["--store-url".to_owned(), u.clone()]),
            )
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
            serving: serde_json::Value::Null,
        };
        let line = gw.wait_log("civgate serving");
        gw.api = line["api"].as_str().unwrap().parse().unwrap();
        gw.admin = line["admin"].as_str().unwrap().parse().unwrap();
        gw.serving = line;
        gw
    }
}

impl Drop for Env {
    /// A PostgreSQL test schema goes with its env (best effort: a gateway still holding a
    /// lock on it leaves it behind).
    fn drop(&mut self) {
        let Some(url) = self.store_url.take() else {
            return;
        };
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(civgate::store::drop_test_schema(&url));
            }
        })
        .join();
    }
}

pub fn ephemeral(dir: &Path) -> Overrides {
    Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(dir.join("data")),
        store_url: None,
    }
}

/// The real binary, its JSON log lines, and its ports.
pub struct Gateway {
    pub child: Child,
    pub logs: mpsc::Receiver<serde_json::Value>,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    /// The "civgate serving" log line.
    pub serving: serde_json::Value,
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

/// Defines each listed `async fn name(env: Env)` as two tests: `sqlite::name` and
/// `postgres::name` (the same behaviour on both backends).
#[macro_export]
macro_rules! on_both_backends {
    ($($t:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $t() {
                    super::$t(super::common::Env::new()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $t() {
                    if let Some(env) = super::common::Env::postgres(stringify!($t)).await {
                        super::$t(env).await
                    }
                }
            )*
        }
    };
}

/// A loopback port nothing listens on right now, for a process that must come back on it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shipped configuration with the publish quota far above any test's load (the sync tests
/// measure durability, not limits).
pub fn unthrottled_publishes() -> String {
    DEFAULT_CONFIG.replace(
        "publishes = { per_second = 500, burst = 1000 }",
        "publishes = { per_second = 1000000, burst = 1000000 }",
    )
}

/// Receipts by idempotency key: (event_id, sequence).
pub type Receipts = std::collections::HashMap<String, (String, u64)>;

/// A population-side death event of a Hải Phòng citizen (registry-hp's), distinct per `n`.
pub fn death_event(n: usize) -> civgate::pb::v1::Event {
    death_in("031", n)
}

/// A population-side death event of a citizen of `province`, distinct per `n`.
pub fn death_in(province: &str, n: usize) -> civgate::pb::v1::Event {
    use civgate::pb::v1::{DeathRecorded, Event, event::Payload};
    Event {
        case_reference: String::new(),
        occurred_at_unix_ms: n as i64,
        in_reply_to: String::new(),
        payload: Some(Payload::DeathRecorded(DeathRecorded {
            personal_id: format!("{province}050{:06}", n % 1_000_000),
            date_of_death: "2026-01-01".into(),
            recording_unit: format!("unit {n}"),
        })),
    }
}

/// The registry a [`Producers`] key's events are addressed to: producer `p` publishes deaths
/// in Hải Phòng (registry-hp) when `p` is even, in Hà Nội (registry-hn) when odd.
pub fn registry_of_key(key: &str) -> &'static str {
    let p: usize = key
        .strip_prefix('p')
        .and_then(|k| k.split('-').next())
        .and_then(|n| n.parse().ok())
        .expect("a Producers key");
    REGISTRIES[p % 2].0
}

/// The two registries of the default config and their provinces.
pub const REGISTRIES: [(&str, &str); 2] = [("registry-hp", "031"), ("registry-hn", "001")];

/// Producers publishing as the population database, each retrying every event with its
/// idempotency key until it gets a receipt; producer `p` starts on gateway `p % addrs.len()`
/// and moves to the next one after an error (a load balancer would).
pub struct Producers {
    receipts: std::sync::Arc<std::sync::Mutex<Receipts>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Producers {
    pub fn start(certs: PathBuf, addrs: Vec<SocketAddr>, producers: usize, each: usize) -> Self {
        use civgate::pb::v1::{PublishRequest, exchange_client::ExchangeClient};
        let receipts: std::sync::Arc<std::sync::Mutex<Receipts>> = Default::default();
        let mut tasks = Vec::new();
        for p in 0..producers {
            let (receipts, certs, addrs) = (receipts.clone(), certs.clone(), addrs.clone());
            tasks.push(tokio::spawn(async move {
                let mut target = p % addrs.len();
                let mut client: Option<ExchangeClient<tonic::transport::Channel>> = None;
                for i in 0..each {
                    let key = format!("p{p}-{i}");
                    loop {
                        if client.is_none() {
                            client =
                                civgate::client::connect(addrs[target], &certs, Some("population"))
                                    .await
                                    .ok()
                                    .map(ExchangeClient::new);
                        }
                        let Some(c) = client.as_mut() else {
                            target = (target + 1) % addrs.len();
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        match c
                            .publish(PublishRequest {
                                idempotency_key: key.clone(),
                                event: Some(death_in(REGISTRIES[p % 2].1, p * each + i)),
                            })
                            .await
                        {
                            Ok(r) => {
                                let r = r.into_inner();
                                let previous = receipts
                                    .lock()
                                    .unwrap()
                                    .insert(key.clone(), (r.event_id, r.sequence));
                                assert!(previous.is_none());
                                break;
                            }
                            Err(_) => {
                                client = None;
                                target = (target + 1) % addrs.len();
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                }
            }));
        }
        Self { receipts, tasks }
    }

    /// Waits for every producer (at most `limit`) and returns the receipts.
    pub async fn finish(self, limit: Duration) -> Receipts {
        for t in self.tasks {
            tokio::time::timeout(limit, t)
                .await
                .expect("producers finish")
                .unwrap();
        }
        self.receipts.lock().unwrap().clone()
    }
}

/// Each registry reading `population` from sequence 1 through `addr` gets every receipted
/// event addressed to it ([`registry_of_key`]) as receipted, in sequence order, exactly once,
/// and nothing else.
pub async fn check_delivery(addr: SocketAddr, certs: &Path, receipts: &Receipts) {
    for (registry, _) in REGISTRIES {
        let mine: Receipts = receipts
            .iter()
            .filter(|(k, _)| registry_of_key(k) == registry)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut got = Delivered::default();
        let mut stream = Subscriber::open(addr, certs, registry, "crash-check", Some(1)).await;
        while got.by_id.len() < mine.len() {
            let m = stream.next().await.expect("delivery");
            got.take(&m);
            stream.ack_every(128, m.sequence).await;
        }
        got.check(&mine);
    }
}

/// What a consumer received: each event id once, with its sequence.
#[derive(Default)]
pub struct Delivered {
    pub by_id: std::collections::HashMap<String, u64>,
    /// Events seen again (after a resume), de-duplicated by event id.
    pub duplicates: usize,
}

impl Delivered {
    pub fn take(&mut self, m: &civgate::pb::v1::SubscribedEvent) {
        if let Some(seq) = self.by_id.insert(m.event_id.clone(), m.sequence) {
            assert_eq!(seq, m.sequence, "event {} at two sequences", m.event_id);
            self.duplicates += 1;
        }
    }

    /// Exactly the receipted events, at their receipted sequences, and nothing else.
    pub fn check(&self, receipts: &Receipts) {
        for (key, (id, seq)) in receipts {
            assert_eq!(
                self.by_id.get(id),
                Some(seq),
                "receipted {key} ({id}, #{seq}) not delivered as receipted"
            );
        }
        assert_eq!(
            self.by_id.len(),
            receipts.len(),
            "{} events delivered for {} addressed",
            self.by_id.len(),
            receipts.len()
        );
    }
}

/// One registry's subscription to `population`, checking that sequences only rise.
pub struct Subscriber {
    pub client: civgate::pb::v1::exchange_client::ExchangeClient<tonic::transport::Channel>,
    stream: tonic::Streaming<civgate::pb::v1::SubscribedEvent>,
    group: String,
    last: u64,
    pub acked: u64,
}

impl Subscriber {
    pub async fn open(
        addr: SocketAddr,
        certs: &Path,
        agency: &str,
        group: &str,
        from: Option<u64>,
    ) -> Self {
        use civgate::pb::v1::{SubscribeRequest, exchange_client::ExchangeClient};
        let mut client = ExchangeClient::new(
            civgate::client::connect(addr, certs, Some(agency))
                .await
                .unwrap(),
        );
        let stream = client
            .subscribe(SubscribeRequest {
                topic: "population".into(),
                consumer_group: group.into(),
                from_sequence: from,
            })
            .await
            .unwrap()
            .into_inner();
        Self {
            client,
            stream,
            group: group.into(),
            last: 0,
            acked: 0,
        }
    }

    /// The next event (`Err`: the stream ended with that status), its sequence above the last.
    pub async fn next(&mut self) -> Result<civgate::pb::v1::SubscribedEvent, tonic::Status> {
        let m = tokio::time::timeout(Duration::from_secs(20), self.stream.message())
            .await
            .expect("an event within 20 s")?
            .ok_or_else(|| tonic::Status::unavailable("stream ended"))?;
        assert!(
            m.sequence > self.last,
            "reorder: {} after {}",
            m.sequence,
            self.last
        );
        self.last = m.sequence;
        Ok(m)
    }

    /// Acknowledges up to `seq` once `every` sequences have passed since the last ack (keeps
    /// the window open).
    pub async fn ack_every(&mut self, every: u64, seq: u64) {
        if seq - self.acked >= every {
            self.ack(seq).await.unwrap();
        }
    }

    pub async fn ack(&mut self, seq: u64) -> Result<(), tonic::Status> {
        self.client
            .ack(civgate::pb::v1::AckRequest {
                topic: "population".into(),
                consumer_group: self.group.clone(),
                sequence: seq,
            })
            .await?;
        self.acked = seq;
        Ok(())
    }
}

/// The records of one page of `SearchEntries`, decoded.
pub async fn search_records(
    audit: &mut civgate::pb::v1::audit_client::AuditClient<tonic::transport::Channel>,
    req: civgate::pb::v1::SearchEntriesRequest,
) -> Vec<civgate::pb::v1::AuditRecord> {
    audit
        .search_entries(req)
        .await
        .unwrap()
        .into_inner()
        .entries
        .iter()
        .map(|e| {
            <civgate::pb::v1::AuditRecord as prost::Message>::decode(e.leaf.as_slice()).unwrap()
        })
        .collect()
}

/// A raw HTTP/2 connection over mutual TLS as `client` (from `source`, another loopback
/// address, when given): for requests a gRPC client would never send.
pub async fn raw_h2(
    addr: SocketAddr,
    certs: &Path,
    client: &str,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<h2::client::SendRequest<bytes::Bytes>> {
    let tcp = tcp_from(addr, source).await?;
    let read = |p: PathBuf| std::fs::read(p).expect("read pem");
    let cfg = civgate::tls::client_config(
        &read(certs.join("ca.pem")),
        Some((
            &read(certs.join(format!("clients/{client}.pem"))),
            &read(certs.join(format!("clients/{client}.key"))),
        )),
    )
    .expect("client config");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// A TCP connection to `addr` from `source` (any port), or from the default address.
pub async fn tcp_from(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = source {
        s.bind(SocketAddr::new(ip, 0))?;
    }
    s.connect(addr).await
}

/// A gRPC request head for `path` (POST, application/grpc).
pub fn grpc_head(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// The value of an unlabelled (or first-labelled) metric in a Prometheus text page.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The gateway process's resident set size, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// A birth registered at `office` (a girl, mother `031195000002`), as a civil registry
/// publishes it.
pub fn birth(office: &str, name: &str) -> civgate::pb::v1::Event {
    use civgate::pb::v1::{Birth, Event, Parent, Registration, Sex, event::Payload};
    Event {
        case_reference: String::new(),
        occurred_at_unix_ms: 0,
        in_reply_to: String::new(),
        payload: Some(Payload::Birth(Birth {
            registration: Some(Registration {
                registry_office_code: office.into(),
                book_number: "01/2026".into(),
                entry_number: "7".into(),
                registration_date: "2026-03-02".into(),
                registering_official: "Trần Văn Bình".into(),
                country: String::new(),
            }),
            full_name: name.into(),
            sex: Sex::Female as i32,
            date_of_birth: "2026-02-27".into(),
            place_of_birth: "Hải Phòng".into(),
            hometown: "Hải Phòng".into(),
            ethnicity: "Kinh".into(),
            nationality: "Việt Nam".into(),
            birth_registration_province_code: "031".into(),
            father: None,
            mother: Some(Parent {
                personal_id: Some("031195000002".into()),
                full_name: "Lê Thị Hoa".into(),
                ..Default::default()
            }),
            foundling: false,
            personal_id: None,
        })),
    }
}

/// [`birth`] with another mother.
pub fn birth_to(mother: &str, name: &str) -> civgate::pb::v1::Event {
    let mut event = birth("HP-LECHAN", name);
    if let Some(civgate::pb::v1::event::Payload::Birth(b)) = &mut event.payload
        && let Some(m) = &mut b.mother
    {
        m.personal_id = Some(mother.into());
    }
    event
}

/// A subscription of `group` to `topic` (from `from`, or after its acknowledgement).
pub async fn stream(
    c: &mut civgate::pb::v1::exchange_client::ExchangeClient<tonic::transport::Channel>,
    topic: &str,
    group: &str,
    from: Option<u64>,
) -> tonic::Streaming<civgate::pb::v1::SubscribedEvent> {
    c.subscribe(civgate::pb::v1::SubscribeRequest {
        topic: topic.into(),
        consumer_group: group.into(),
        from_sequence: from,
    })
    .await
    .unwrap()
    .into_inner()
}

/// The next `n` events of a subscription, each within 10 s.
pub async fn take(
    s: &mut tonic::Streaming<civgate::pb::v1::SubscribedEvent>,
    n: usize,
) -> Vec<civgate::pb::v1::SubscribedEvent> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(
            tokio::time::timeout(Duration::from_secs(10), s.message())
                .await
                .expect("an event within 10 s")
                .unwrap()
                .unwrap(),
        );
    }
    v
}

/// Their sequences.
pub fn seqs(v: &[civgate::pb::v1::SubscribedEvent]) -> Vec<u64> {
    v.iter().map(|e| e.sequence).collect()
}

/// An Exchange client with `who`'s certificate.
pub async fn as_agency(
    env: &Env,
    addr: SocketAddr,
    who: &str,
) -> civgate::pb::v1::exchange_client::ExchangeClient<tonic::transport::Channel> {
    civgate::pb::v1::exchange_client::ExchangeClient::new(
        civgate::client::connect(addr, &env.certs(), Some(who))
            .await
            .unwrap(),
    )
}

/// Publishes `event` under `key`; its receipt (a failure panics, naming the key).
pub async fn publish(
    c: &mut civgate::pb::v1::exchange_client::ExchangeClient<tonic::transport::Channel>,
    key: &str,
    event: civgate::pb::v1::Event,
) -> civgate::pb::v1::PublishReceipt {
    c.publish(civgate::pb::v1::PublishRequest {
        idempotency_key: key.into(),
        event: Some(event),
    })
    .await
    .unwrap_or_else(|e| panic!("publish {key}: {e:?}"))
    .into_inner()
}

/// The auditor's client (`civgate audit`'s), with the auditor's certificate.
pub async fn audit_online(env: &Env, addr: SocketAddr) -> civgate::audit::auditor::Online {
    civgate::audit::auditor::Online::new(
        civgate::client::connect(addr, &env.certs(), Some("auditor"))
            .await
            .unwrap(),
    )
}

/// An OpenTelemetry collector on loopback (OTLP over gRPC, plain HTTP/2): it keeps every span
/// exported to it.
pub struct Collector {
    pub addr: SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
    _server: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Default)]
struct CollectorService {
    spans: std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for CollectorService
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut kept = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                kept.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

impl Collector {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = CollectorService::default();
        let spans = service.spans.clone();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(
                    opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(service),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Self {
            addr,
            spans,
            _server: server,
        }
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.spans.lock().unwrap().clone()
    }
}

/// The shipped config with its flow table replaced by `flows` (`[[cases.flows]]` rows).
pub fn with_flows(flows: &str) -> String {
    let text = civgate::config::DEFAULT_CONFIG;
    let cut = text
        .find("\n[[cases.flows]]")
        .expect("the shipped config has a flow table");
    assert!(
        text[cut..]
            .lines()
            .filter(|l| l.starts_with('['))
            .all(|l| l == "[[cases.flows]]"),
        "the flow table ends the shipped config"
    );
    format!("{}\n{flows}", &text[..cut])
}
