//! Federated commands: `simulate` (the main job), `server` and `client` (deployment over gRPC +
//! TLS), `certs` (development certificates and client tokens), `report` (report.html).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use hetfed_data::DataDir;
use hetfed_fed::server::{Auth, Server};
use hetfed_fed::RunConfig;
use hetfed_net::{Caller, ClientTls, FedService, GrpcClient, Limits, Secret, ServerTls};

#[derive(Args)]
pub struct ConfigArgs {
    /// Run configuration (TOML; see configs/simulate.toml). Default: the embedded default run.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (default: $HETFED_DATA_DIR, else ../shared/data if it exists, else the
    /// per-user cache, where missing datasets are fetched first; see `hetfed data fetch --help`)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Never fetch a missing dataset (also $HETFED_OFFLINE=1); the error names the fetch command
    #[arg(long)]
    pub offline: bool,
}

impl ConfigArgs {
    /// The run configuration, checked against its models' limits (LoRA rank, context) before
    /// any model loads; `client_model` is `hetfed client --model`.
    fn load(&self, client_model: Option<&Path>) -> Result<(RunConfig, DataDir)> {
        let cfg = match &self.config {
            Some(p) => RunConfig::from_file(p)?,
            None => RunConfig::embedded_default()?,
        };
        let origin =
            self.config.as_ref().map_or_else(|| "the embedded default config".to_string(), |p| p.display().to_string());
        cfg.check_models(client_model).with_context(|| origin)?;
        let (dir, auto) = resolve_data_dir(self.data_dir.as_deref())?;
        crate::data::ensure(&dir, run_needs(&cfg), auto, self.offline || crate::data::offline_env())?;
        Ok((cfg, dir))
    }
}

/// The datasets a run reads: its clients' tasks, the server's evaluation tasks, and `mltext`
/// English (general text) when the run evaluates general text or transfers.
pub fn run_needs(cfg: &RunConfig) -> Vec<crate::data::Need> {
    let registry = hetfed_data::TaskRegistry::new();
    let mut needs: Vec<crate::data::Need> = cfg
        .data
        .task_names()
        .iter()
        .chain(&cfg.server.eval.tasks)
        .filter_map(|t| registry.get(t).ok())
        .map(|t| crate::data::need_of(&t.dataset))
        .collect();
    if cfg.transfer.is_some() || cfg.server.eval.general_lines > 0 {
        needs.push(("mltext".into(), Some(vec!["en".into()])));
    }
    needs
}

/// The data directory of the federated commands: `--data-dir`, else `$HETFED_DATA_DIR`, else
/// `../shared/data` when it exists, else the per-user cache. The flag is true for the cache
/// (nothing was given and `../shared` is absent): commands fetch what they miss there.
pub fn resolve_data_dir(flag: Option<&Path>) -> Result<(DataDir, bool)> {
    let env_set = std::env::var_os(hetfed_data::DATA_DIR_ENV).is_some_and(|v| !v.is_empty());
    if flag.is_some() || env_set {
        return Ok((DataDir::resolve(flag)?, false));
    }
    let shared = Path::new("../shared/data");
    if shared.is_dir() {
        return Ok((DataDir::new(shared), false));
    }
    let dir = DataDir::resolve(None)?;
    let auto = crate::data::is_cache(&dir);
    Ok((dir, auto))
}

/// [`resolve_data_dir`], then (in the per-user cache, unless `$HETFED_OFFLINE` is set) the
/// missing files of `needs` fetched: for commands without `--offline` (`sweep`, `demo`).
pub fn data_dir_for(flag: Option<&Path>, needs: Vec<crate::data::Need>) -> Result<DataDir> {
    let (dir, auto) = resolve_data_dir(flag)?;
    crate::data::ensure(&dir, needs, auto, crate::data::offline_env())?;
    Ok(dir)
}

#[derive(Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub c: ConfigArgs,
    /// Run directory: metrics.jsonl, checkpoints/, report.html
    #[arg(long, value_name = "DIR", default_value = "runs/simulate")]
    pub out: PathBuf,
    /// Continue the run in --out from its latest checkpoint
    #[arg(long)]
    pub resume: bool,
}

#[derive(Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub c: ConfigArgs,
    #[arg(long, value_name = "DIR", default_value = "runs/server")]
    pub out: PathBuf,
    #[arg(long)]
    pub resume: bool,
}

#[derive(Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub c: ConfigArgs,
    /// This client's id (its share of the data is the partition with the id's number: c2 → 2)
    #[arg(long)]
    pub id: String,
    /// File holding this client's token (default: $HETFED_TOKEN)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The client's own model directory (default: the config's server.model)
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Where this client keeps what a restart must not lose: the adapters it continues across
    /// rounds (`[client] keep_adapter`) (default: runs/clients/<id>)
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct CertsArgs {
    /// Where to write ca.pem, server.pem/.key, client.pem/.key, tokens.toml and <id>.token
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Client ids to issue tokens for
    #[arg(long, value_delimiter = ',', default_value = "c0,c1,c2")]
    pub clients: Vec<String>,
    /// Host names / IP addresses the server certificate is valid for
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub hosts: Vec<String>,
}

#[derive(Args)]
pub struct ReportArgs {
    /// A run directory with metrics.jsonl
    pub run_dir: PathBuf,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("starting the async runtime")
}

/// A live line per second: round, clients reporting, registrations.
fn progress(server: Arc<Server>, rounds: u64) -> tokio::task::JoinHandle<()> {
    let pb = crate::commands::progress_bar(rounds, "rounds");
    tokio::spawn(async move {
        loop {
            let (round, selected, done, registered) = server.progress();
            pb.set_position(round.saturating_sub(1));
            pb.set_message(format!("round {round}: {done}/{selected} clients reported, {registered} registered"));
            if server.all_finished() {
                pb.finish_and_clear();
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

fn finish(run_dir: &Path, summary: &hetfed_fed::server::RunSummary) -> Result<()> {
    let report = hetfed_report::render_report(run_dir)?;
    let evals: Vec<String> = summary.final_eval.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    println!(
        "{} rounds in {:.0} s; final server evaluation: {}",
        summary.rounds_completed,
        summary.wall_s,
        if evals.is_empty() { "none".into() } else { evals.join(", ") }
    );
    println!("metrics  {}", run_dir.join("metrics.jsonl").display());
    println!("report   {}", report.display());
    Ok(())
}

pub fn simulate(a: SimulateArgs) -> Result<()> {
    let (cfg, dir) = a.c.load(None)?;
    println!(
        "simulating {} rounds of {} with {} clients on {}, server model {}",
        cfg.run.rounds,
        cfg.strategy_name(),
        cfg.client_ids().len(),
        cfg.data.describe(),
        cfg.path(&cfg.server.model).display()
    );
    if let Some(t) = &cfg.transfer {
        let smalls: Vec<String> = t.client_models.iter().map(|m| cfg.path(m).display().to_string()).collect();
        println!(
            "clients train {}; the server {} their updates (maps: {}, fitted once and cached in {})",
            smalls.join(", "),
            match t.aggregation {
                hetfed_fed::hetero::Aggregation::Projection => "projects",
                hetfed_fed::hetero::Aggregation::Distillation => "distils",
                hetfed_fed::hetero::Aggregation::OffsetServing => "serves the logit offsets of",
                hetfed_fed::hetero::Aggregation::OffsetDistillation => "distils the logit offsets of",
            },
            t.maps.method.name(),
            t.cache_dir.clone().unwrap_or_else(|| PathBuf::from("runs/maps")).display()
        );
    }
    let rt = runtime()?;
    let out = a.out.clone();
    let summary = rt.block_on(async move {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cfg2 = cfg.clone();
        let out2 = out.clone();
        let sim = tokio::spawn(async move {
            hetfed_fed::assemble::simulate_with(&cfg2, &dir, &out2, a.resume, None, |server| {
                let _ = tx.send(server);
            })
            .await
        });
        if let Ok(server) = rx.await {
            progress(server, cfg.run.rounds);
        }
        anyhow::Ok(sim.await.context("simulation task")??)
    })?;
    finish(&a.out, &summary.summary)
}

fn read_tokens(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the token table {}", path.display()))?;
    let t: BTreeMap<String, String> = toml::from_str(&text)
        .with_context(|| format!("{}: expected a TOML table of client id = \"sha256 of its token\"", path.display()))?;
    Ok(t)
}

pub fn server(a: ServerArgs) -> Result<()> {
    let (cfg, dir) = a.c.load(None)?;
    let Some(dep) = cfg.deploy.clone() else {
        bail!("the config has no [deploy] section (listen, server, ca, cert, key, tokens)")
    };
    let mut auth = Auth::default();
    for (id, hash) in read_tokens(&cfg.path(&dep.tokens))? {
        auth.add_token_hash(&id, &hash);
    }
    for id in &dep.revoked {
        auth.revoke(id);
    }
    let tls = ServerTls::from_files(
        &cfg.path(&dep.cert),
        &cfg.path(&dep.key),
        dep.mutual_tls.then(|| cfg.path(&dep.ca)).as_deref(),
    )?;
    let rt = runtime()?;
    let out = a.out.clone();
    let summary = rt.block_on(async move {
        let server = hetfed_fed::assemble::build_server(&cfg, &dir, &out, auth, a.resume)?;
        let listener = tokio::net::TcpListener::bind(&dep.listen)
            .await
            .with_context(|| format!("deploy.listen: cannot listen on {:?}", dep.listen))?;
        let addr = listener.local_addr()?;
        println!("listening on {addr} (TLS); run {}", server.run_id());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let svc: Arc<dyn FedService> = server.clone();
        let grpc = tokio::spawn(hetfed_net::serve_with_listener(svc, listener, tls, Limits::default(), async move {
            let _ = stop_rx.await;
        }));
        progress(server.clone(), cfg.run.rounds);
        let summary = server.run().await;
        // Give clients a moment to learn that the run is over.
        let t = tokio::time::Instant::now();
        while !server.all_finished() && t.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = stop_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), grpc).await;
        anyhow::Ok(summary?)
    })?;
    finish(&a.out, &summary)
}

pub fn client(a: ClientArgs) -> Result<()> {
    let (cfg, dir) = a.c.load(a.model.as_deref())?;
    let Some(dep) = cfg.deploy.clone() else { bail!("the config has no [deploy] section (server, ca, domain)") };
    let index: usize = a.id.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().with_context(|| {
        format!("--id: expected an id ending in the client's partition number (c0, c1, ...), found {:?}", a.id)
    })?;
    let token = match &a.token_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading the token file {}", p.display()))?
            .trim()
            .to_string(),
        None => std::env::var("HETFED_TOKEN")
            .context("expected --token-file or the HETFED_TOKEN variable, found neither")?,
    };
    let caller = Caller { client_id: a.id.clone(), token: Secret::new(token) };
    let mut opts = hetfed_fed::assemble::build_client(&cfg, &dir, index, caller.clone(), a.model.as_deref())?;
    opts.state_dir = Some(a.state_dir.clone().unwrap_or_else(|| Path::new("runs/clients").join(&a.id)));
    let id = a.id.clone();
    let prefix = id.clone();
    opts.on_round = Some(Arc::new(move |line: String| println!("client {prefix}: {line}")));
    let ca = cfg.path(&dep.ca);
    let identity = dep.mutual_tls.then(|| (ca.with_file_name("client.pem"), ca.with_file_name("client.key")));
    let tls =
        ClientTls::from_files(&ca, dep.domain.clone(), identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())))?;
    let rt = runtime()?;
    let summary = rt.block_on(async move {
        // The server may not be up yet: connect with the client's backoff for up to
        // `deploy.give_up_s` (two minutes by default).
        let mut retry =
            hetfed_fed::client::Retry::new(Duration::from_millis(200), Duration::from_secs_f64(dep.give_up_s));
        let conn = loop {
            match GrpcClient::connect(
                &dep.server,
                tls.clone(),
                caller.clone(),
                Limits::default(),
                Duration::from_secs(10),
            )
            .await
            {
                Ok(c) => break c,
                Err(e) => retry.wait(&e).await?,
            }
        };
        let svc: Arc<dyn FedService> = Arc::new(conn);
        anyhow::Ok(hetfed_fed::client::run_client(svc, opts).await?)
    })?;
    println!("client {id}: trained in rounds {:?}; refused: {:?}", summary.rounds_trained, summary.refused);
    Ok(())
}

pub fn certs(a: CertsArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let paths = hetfed_net::generate_dev_certs(&a.out, &a.hosts)?;
    let mut table = String::from("# client id = \"sha256 of its token\" (the server never stores tokens)\n");
    for id in &a.clients {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("--clients: expected ids of letters, digits, '-' or '_', found {id:?}");
        }
        let token = hetfed_fed::assemble::random_token();
        let path = a.out.join(format!("{id}.token"));
        write_secret(&path, &token)?;
        table.push_str(&format!("{id} = \"{}\"\n", hetfed_core::sha256_hex(token.as_bytes())));
    }
    let tokens = a.out.join("tokens.toml");
    std::fs::write(&tokens, table).with_context(|| format!("writing {}", tokens.display()))?;
    println!(
        "CA {}; server certificate {} for {:?}; tokens for {:?} in {}",
        paths.ca_cert.display(),
        paths.server_cert.display(),
        a.hosts,
        a.clients,
        tokens.display()
    );
    Ok(())
}

fn write_secret(path: &Path, s: &str) -> Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(s.as_bytes())?;
    Ok(())
}

pub fn report(a: ReportArgs) -> Result<()> {
    let p = hetfed_report::render_report(&a.run_dir)?;
    println!("{}", p.display());
    Ok(())
}
