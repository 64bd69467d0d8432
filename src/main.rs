//! The `civgate` binary: command-line parsing and dispatch only.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use civgate::{
    bench, certs, config, demo, refdb,
    server::{self, ConfigSource, Overrides},
    state::Snapshot,
    telemetry, tls,
};

#[derive(Parser)]
#[command(
    name = "civgate",
    version,
    about = "gRPC gateway between Vietnam's civil-status database and the National Population Database"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where the store URL may come from besides `[store] url`: a flag or variable (visible to
/// whoever can read the process's command line or environment), or a file (a secret).
#[derive(clap::Args)]
struct StoreUrl {
    /// Overrides [store] url (postgres://…: journal and audit log in PostgreSQL).
    #[arg(long, env = "CIVGATE_STORE_URL", hide_env_values = true)]
    store_url: Option<String>,
    /// Overrides [store] url with the URL held in this file (one line): keeps the password out
    /// of the command line, the environment and the config file.
    #[arg(long, env = "CIVGATE_STORE_URL_FILE", conflicts_with = "store_url")]
    store_url_file: Option<PathBuf>,
}

impl StoreUrl {
    /// The URL given, if any; the file's is read now.
    fn resolve(self) -> anyhow::Result<Option<String>> {
        use anyhow::Context;
        match (self.store_url, self.store_url_file) {
            (Some(u), _) => Ok(Some(u)),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("--store-url-file: cannot read {}", f.display()))?;
                anyhow::ensure!(
                    text.trim().lines().count() == 1,
                    "--store-url-file: {} must hold the URL on one line",
                    f.display()
                );
                Ok(Some(text.trim().to_owned()))
            }
            (None, None) => Ok(None),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded demo over real mTLS on loopback (creates dev certificates if missing).
    Demo {
        #[arg(long, default_value = "certs")]
        certs_dir: PathBuf,
    },
    /// Run the gateway.
    Serve {
        #[arg(long, env = "CIVGATE_CONFIG", default_value = "civgate.toml")]
        config: PathBuf,
        /// Overrides [server] listen.
        #[arg(long, env = "CIVGATE_LISTEN")]
        listen: Option<SocketAddr>,
        /// Overrides [server] admin_listen.
        #[arg(long, env = "CIVGATE_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// Overrides [server] data_dir.
        #[arg(long, env = "CIVGATE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        store: StoreUrl,
    },
    /// Apply the PostgreSQL schema of [store] url (or --store-url) and exit.
    Migrate {
        #[arg(long, env = "CIVGATE_CONFIG", default_value = "civgate.toml")]
        config: PathBuf,
        #[command(flatten)]
        store: StoreUrl,
    },
    /// Development PKI.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// The reference population directory (upstream for look-ups).
    Refdb {
        #[command(subcommand)]
        command: RefdbCommand,
    },
    /// Auditor tools: checkpoint, verify, prove, search, export, keygen.
    Audit {
        #[command(subcommand)]
        command: civgate::audit::cli::Command,
    },
    /// Requests with deadlines: who is late (`overdue`), a case's steps (`show CASE`).
    Cases {
        #[command(subcommand)]
        command: civgate::audit::cases::Command,
    },
    /// Load generators against a running gateway or directory.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a development CA, server and client certificates, and a CRL.
    Init {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Add clients/<NAME>.pem to crl.pem (re-signed with ca.key).
    Revoke {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        name: String,
    },
}

#[derive(Subcommand)]
enum RefdbCommand {
    /// Serve the directory over mTLS with a deterministic synthetic population.
    Serve {
        #[arg(long, default_value = "civgate.toml")]
        config: PathBuf,
        /// Overrides [refdb] listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides [refdb] data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Number of synthetic citizens (overrides [refdb] citizens).
        #[arg(long)]
        citizens: Option<usize>,
        /// Generator seed (overrides [refdb] seed).
        #[arg(long)]
        seed: Option<u64>,
        /// Also act as the population database on the gateway at this address: consume
        /// `civil-status` (group population-db), apply each event to the directory, publish
        /// the answers, reject what contradicts the records. Reconnects by itself.
        #[arg(long, value_name = "HOST:PORT")]
        consume: Option<SocketAddr>,
        /// Certificates for --consume: the development PKI's layout (clients/population.pem).
        #[arg(long, default_value = "certs")]
        certs: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config and every file it names; errors name the key and the line.
    Check {
        #[arg(long, default_value = "civgate.toml")]
        config: PathBuf,
    },
}

/// mimalloc: the request path allocates and frees many small buffers across threads (HTTP/2
/// frames, protobuf messages, audit records); glibc malloc spent ~16% of gateway CPU there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tls::install_provider();
    let cli = Cli::parse();
    // The demo tells its own story: its calls' access lines would drown it.
    let default_filter = match cli.command {
        Command::Demo { .. } => "info,civgate::access=off",
        _ => "info",
    };
    telemetry::init_logging(matches!(cli.log_format, LogFormat::Json), default_filter);
    let runtime = match runtime(&cli.command).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    telemetry::flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime: for `serve`, as `[server] worker_threads` asks (a config that does not
/// load gets the default here; `serve` then reports its errors); for `bench publish` and `bench
/// subscribe`, their `--threads`; one thread per core otherwise.
fn runtime(command: &Command) -> tokio::runtime::Builder {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let threads = match command {
        Command::Serve { config, .. } => config::Config::load(config)
            .map(|c| c.file.server)
            .unwrap_or_default()
            .serving_threads(cores),
        Command::Bench {
            command: bench::BenchCommand::Publish(a) | bench::BenchCommand::Subscribe(a),
        } => a.threads,
        _ => cores,
    };
    match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo { certs_dir } => demo::run(&certs_dir).await,
        Command::Serve {
            config,
            listen,
            admin_listen,
            data_dir,
            store,
        } => {
            let overrides = Overrides {
                listen,
                admin_listen,
                data_dir,
                store_url: store.resolve()?,
            };
            // Before anything says "serving": a signal sent on that line must find its handler.
            let signals = server::Signals::install()?;
            let running = server::start(ConfigSource::File(config), overrides).await?;
            running.run_until_signalled(signals).await
        }
        Command::Migrate { config, store } => {
            let version = server::migrate(&config, store.resolve()?).await?;
            println!("schema at version {version}");
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Init { dir, force },
        } => {
            let written = certs::init(&dir, force)?;
            for p in &written {
                println!("wrote {}", p.display());
            }
            println!(
                "development PKI ready in {} (see certs/README.md)",
                dir.display()
            );
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Revoke { dir, name },
        } => {
            certs::revoke(&dir, &name)?;
            println!(
                "{} now lists clients/{name}.pem; send SIGHUP to reload",
                dir.join("crl.pem").display()
            );
            Ok(())
        }
        Command::Refdb {
            command:
                RefdbCommand::Serve {
                    config,
                    listen,
                    data_dir,
                    citizens,
                    seed,
                    consume,
                    certs,
                },
        } => {
            let signals = server::Signals::install()?;
            let cfg = config::Config::load(&config)?;
            let running = refdb::start(
                &cfg,
                refdb::RefdbOverrides {
                    listen,
                    data_dir,
                    citizens,
                    seed,
                },
            )
            .await?;
            if let Some(gateway) = consume {
                tokio::spawn(refdb::sync::consume_forever(
                    gateway,
                    certs,
                    running.store.clone(),
                ));
            }
            running.run_until_signalled(signals).await
        }
        Command::Bench { command } => bench::run(command).await,
        Command::Audit { command } => civgate::audit::cli::run(command).await,
        Command::Cases { command } => civgate::audit::cases::run(command).await,
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let cfg = config::Config::load(&config)?;
            let snap = Snapshot::build(cfg, None)?;
            println!(
                "{}: OK ({} agencies, {} purposes)",
                config.display(),
                snap.policy.agencies.len(),
                snap.config.file.purposes.len()
            );
            Ok(())
        }
    }
}
