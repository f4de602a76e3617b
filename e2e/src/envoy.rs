//! A real Envoy process per test: generated bootstrap, free ports, readiness polling,
//! admin helpers, killed with its process group on Drop.

use std::fs::{self, File};
use std::io::{BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{read_response, Client, Request, Response};
use crate::netns::Netns;
use crate::upstream::Upstream;

/// Envoy compiles the wasm module with V8 once per VM; a cold start takes a few seconds.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The HttpConnectionManager path options the shipped configurations set (field, JSON
/// value): RFC 3986 normalization, merged slashes, and escaped slashes unescaped with a
/// redirect, so that upstream and filter see one spelling (README, "Security").
pub const SHIPPED_PATH_OPTIONS: [(&str, &str); 3] = [
    ("normalize_path", "true"),
    ("merge_slashes", "true"),
    (
        "path_with_escaped_slashes_action",
        "\"UNESCAPE_AND_REDIRECT\"",
    ),
];

/// A change applied to the generated bootstrap before Envoy starts.
pub type Tweak = Arc<dyn Fn(&mut Value) + Send + Sync>;

/// How to start Envoy. [`EnvoyOptions::new`] gives the usual set-up: the meshlimit filter
/// with the given plugin configuration, `--concurrency 2`, routing to a direct response
/// unless [`EnvoyOptions::upstream`] is set.
#[derive(Clone)]
pub struct EnvoyOptions {
    /// The filter's plugin configuration (JSON text); `None` leaves the filter out.
    pub plugin_config: Option<String>,
    pub concurrency: u32,
    /// Route everything to the cluster `demo_upstream` at this port.
    pub upstream_port: Option<u16>,
    /// Extra STATIC HTTP/1.1 clusters on 127.0.0.1: (name, port).
    pub clusters: Vec<(String, u16)>,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    /// The bootstrap's `node.id` and `node.locality.zone` (what the filter's
    /// `service.proxy_id` and `zone` default to).
    pub node: Option<(String, String)>,
    /// Environment variables of the filter's VM (`vm_config.environment_variables`),
    /// e.g. the companion's token for `service.token_env`.
    pub vm_env: Vec<(String, String)>,
    /// Last-word edits of the bootstrap JSON, for anything the fields do not cover.
    pub tweaks: Vec<Tweak>,
    /// The address of the listener and the admin interface (default 127.0.0.1).
    pub listen_ip: Ipv4Addr,
    /// (listener, admin) ports; default: free ports picked at start.
    pub ports: Option<(u16, u16)>,
    /// Run inside this network namespace (created by the caller, e.g. the three-AZ
    /// topology); `listen_ip` must then be one of its addresses.
    pub netns: Option<String>,
    /// Directory for the config and the log, created and left for the caller to remove;
    /// default: a new temp dir, removed on Drop unless the test is panicking.
    pub dir: Option<PathBuf>,
}

impl EnvoyOptions {
    pub fn new(plugin_config: &str) -> EnvoyOptions {
        EnvoyOptions {
            plugin_config: Some(plugin_config.to_owned()),
            ..EnvoyOptions::without_filter()
        }
    }

    /// Envoy without the wasm filter (a baseline).
    pub fn without_filter() -> EnvoyOptions {
        EnvoyOptions {
            plugin_config: None,
            concurrency: 2,
            upstream_port: None,
            clusters: Vec::new(),
            use_remote_address: false,
            xff_num_trusted_hops: 0,
            node: None,
            vm_env: Vec::new(),
            tweaks: Vec::new(),
            listen_ip: Ipv4Addr::LOCALHOST,
            ports: None,
            netns: None,
            dir: None,
        }
    }

    pub fn upstream(mut self, upstream: &Upstream) -> Self {
        self.upstream_port = Some(upstream.port);
        self
    }

    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    pub fn cluster(mut self, name: &str, port: u16) -> Self {
        self.clusters.push((name.to_owned(), port));
        self
    }

    pub fn use_remote_address(mut self, on: bool) -> Self {
        self.use_remote_address = on;
        self
    }

    pub fn xff_num_trusted_hops(mut self, hops: u32) -> Self {
        self.xff_num_trusted_hops = hops;
        self
    }

    pub fn node(mut self, id: &str, zone: &str) -> Self {
        self.node = Some((id.to_owned(), zone.to_owned()));
        self
    }

    pub fn vm_env(mut self, name: &str, value: &str) -> Self {
        self.vm_env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets a field of the listener's HttpConnectionManager (e.g. `normalize_path`).
    pub fn hcm(self, field: &str, value: Value) -> Self {
        let field = field.to_owned();
        self.tweak(move |b| {
            b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                ["typed_config"][field.as_str()] = value.clone();
        })
    }

    /// The path options `envoy/envoy.yaml` and the Istio EnvoyFilter ship
    /// ([`SHIPPED_PATH_OPTIONS`]; a test checks both files hold them).
    pub fn shipped_path_options(self) -> Self {
        SHIPPED_PATH_OPTIONS
            .iter()
            .fold(self, |o, (k, v)| o.hcm(k, serde_json::from_str(v).unwrap()))
    }

    pub fn tweak(mut self, f: impl Fn(&mut Value) + Send + Sync + 'static) -> Self {
        self.tweaks.push(Arc::new(f));
        self
    }

    /// Listener and admin on `ip`, at fixed ports.
    pub fn listen(mut self, ip: Ipv4Addr, port: u16, admin_port: u16) -> Self {
        self.listen_ip = ip;
        self.ports = Some((port, admin_port));
        self
    }

    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// The Envoy bootstrap for these options, listening on `port` with admin on `admin_port`.
    pub fn bootstrap(&self, port: u16, admin_port: u16) -> Value {
        let mut http_filters = Vec::new();
        if let Some(plugin_config) = &self.plugin_config {
            let mut filter = wasm_filter(plugin_config, &crate::filter_wasm());
            if !self.vm_env.is_empty() {
                let vars: serde_json::Map<String, Value> = (self.vm_env.iter())
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect();
                filter["typed_config"]["config"]["vm_config"]["environment_variables"] =
                    json!({ "key_values": vars });
            }
            http_filters.push(filter);
        }
        http_filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
        }));
        let route = match self.upstream_port {
            Some(_) => json!({"match": {"prefix": "/"}, "route": {"cluster": "demo_upstream"}}),
            None => json!({"match": {"prefix": "/"}, "direct_response": {
                "status": 200,
                "body": {"inline_string": "direct"},
            }}),
        };
        let mut clusters: Vec<Value> = self
            .clusters
            .iter()
            .map(|(name, port)| static_cluster(name, *port))
            .collect();
        if let Some(p) = self.upstream_port {
            clusters.push(static_cluster("demo_upstream", p));
        }
        let mut bootstrap = json!({
            "admin": {"address": socket_address_at(self.listen_ip, admin_port)},
            "static_resources": {
                "listeners": [{
                    "name": "main",
                    "address": socket_address_at(self.listen_ip, port),
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "ingress",
                            "codec_type": "AUTO",
                            "use_remote_address": self.use_remote_address,
                            "xff_num_trusted_hops": self.xff_num_trusted_hops,
                            "route_config": {"name": "local", "virtual_hosts": [{
                                "name": "all", "domains": ["*"], "routes": [route],
                            }]},
                            "http_filters": http_filters,
                        }
                    }]}]
                }],
                "clusters": clusters,
            }
        });
        if let Some((id, zone)) = &self.node {
            bootstrap["node"] = json!({"id": id, "locality": {"zone": zone}});
        }
        for tweak in &self.tweaks {
            tweak(&mut bootstrap);
        }
        bootstrap
    }
}

/// The `envoy.filters.http.wasm` entry: V8, vm_id and root_id `meshlimit`, the plugin
/// configuration as a StringValue (exactly what Istio sends for a WasmPlugin).
fn wasm_filter(plugin_config: &str, wasm: &Path) -> Value {
    let config = json!({
        "name": "meshlimit",
        "root_id": "meshlimit",
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": plugin_config,
        },
        "vm_config": {
            "vm_id": "meshlimit",
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": wasm.to_string_lossy()}},
        },
    });
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": config,
        }
    })
}

fn socket_address(port: u16) -> Value {
    socket_address_at(Ipv4Addr::LOCALHOST, port)
}

fn socket_address_at(ip: Ipv4Addr, port: u16) -> Value {
    json!({"socket_address": {"address": ip.to_string(), "port_value": port}})
}

fn static_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": socket_address(port)}}
        ]}]},
    })
}

/// A running Envoy. Killed (with its process group) on Drop; its temp dir (config and
/// log) is removed then, unless the test is panicking, so a failure can be inspected.
pub struct Envoy {
    /// The address of the listener and the admin interface.
    pub ip: Ipv4Addr,
    pub port: u16,
    pub admin_port: u16,
    pub dir: PathBuf,
    /// The caller gave `dir` and removes it.
    caller_dir: bool,
    child: Option<Child>,
}

impl Envoy {
    /// The filter with `plugin_config`, in front of `upstream`; panics with Envoy's log
    /// if it does not become ready.
    pub fn start(plugin_config: &str, upstream: &Upstream) -> Envoy {
        Envoy::start_with(EnvoyOptions::new(plugin_config).upstream(upstream))
    }

    pub fn start_with(opts: EnvoyOptions) -> Envoy {
        Envoy::try_start_with(opts)
            .unwrap_or_else(|log| panic!("Envoy did not become ready. Its log:\n{log}"))
    }

    /// Like [`Envoy::start`], but returns Envoy's log when it exits or never becomes
    /// ready (e.g. the filter refused its configuration).
    pub fn try_start(plugin_config: &str, upstream: &Upstream) -> Result<Envoy, String> {
        Envoy::try_start_with(EnvoyOptions::new(plugin_config).upstream(upstream))
    }

    pub fn try_start_with(opts: EnvoyOptions) -> Result<Envoy, String> {
        let (port, admin_port) = opts
            .ports
            .unwrap_or_else(|| (crate::free_port(), crate::free_port()));
        let bootstrap = opts.bootstrap(port, admin_port);
        let (dir, caller_dir) = match &opts.dir {
            Some(d) => {
                fs::create_dir_all(d).expect("create envoy dir");
                (d.clone(), true)
            }
            None => (new_temp_dir(), false),
        };
        let netns = opts.netns.as_deref().map(Netns::open);
        let config_path = dir.join("envoy.json");
        fs::write(&config_path, serde_json::to_vec_pretty(&bootstrap).unwrap())
            .expect("write envoy config");
        let log = File::create(dir.join("envoy.log")).expect("create envoy log");
        let mut cmd = Command::new(crate::envoy_bin());
        cmd.arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &opts.concurrency.to_string()])
            // No hot-restart shared memory, so several Envoys can run side by side.
            .arg("--disable-hot-restart")
            .args(["--log-level", "info"])
            .current_dir(crate::repo_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Its own process group (Drop kills the whole group), dying with the test process.
        let child = crate::process::spawn(cmd, netns.as_ref())
            .map_err(|e| format!("cannot spawn envoy: {e}"))?;
        let mut envoy = Envoy {
            ip: opts.listen_ip,
            port,
            admin_port,
            dir,
            caller_dir,
            child: Some(child),
        };
        match envoy.wait_ready() {
            Ok(()) => Ok(envoy),
            Err(why) => {
                envoy.kill();
                Err(format!("{why}\n{}", envoy.log()))
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut delay = Duration::from_millis(10);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("envoy exited during start-up ({status})"));
            }
            // LIVE on /ready means the listeners are in place and the workers run.
            // A connect to the listener (no request: that would go through the filter
            // and spend a token) confirms it accepts.
            let live = matches!(self.try_admin("/ready"), Ok((200, body)) if body.trim() == "LIVE");
            if live && TcpStream::connect((self.ip, self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("envoy not ready after {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// `http://<ip>:<port><path>` for the listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}{}", self.ip, self.port, path)
    }

    /// The listener's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    /// A keep-alive client to the listener.
    pub fn client(&self) -> Client {
        Client::to(self.addr())
    }

    /// One request on a new connection.
    pub fn send(&self, req: &Request) -> Response {
        self.client().send(req)
    }

    pub fn get(&self, path: &str) -> Response {
        self.send(&Request::get(path))
    }

    /// Everything Envoy wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// GET on the admin interface: (status, body). Panics if the admin does not answer.
    pub fn admin(&self, path: &str) -> (u16, String) {
        self.try_admin(path)
            .unwrap_or_else(|e| panic!("admin {path}: {e}"))
    }

    fn try_admin(&self, path: &str) -> std::io::Result<(u16, String)> {
        let addr = SocketAddr::from((self.ip, self.admin_port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
        stream.write_all(req.as_bytes())?;
        let resp = read_response(&mut BufReader::new(stream), false)?;
        Ok((resp.status, resp.body_str()))
    }

    /// `/stats/prometheus`: the filter's metrics appear as `meshlimit_*`.
    pub fn stats_prometheus(&self) -> String {
        self.admin("/stats/prometheus").1
    }

    /// The value of a counter or gauge by its Envoy stat name, e.g.
    /// `http.ingress.downstream_rq_2xx`. Custom wasm metrics live under `wasmcustom.`
    /// in Envoy; the bare name (`meshlimit_requests_total`) is looked up there too.
    /// Tagged metrics (names with tags) are matched on their flattened stat name.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let stats = self.admin("/stats").1;
        let custom = format!("wasmcustom.{name}");
        stats.lines().find_map(|line| {
            let (n, v) = line.split_once(": ")?;
            (n == name || n == custom).then(|| v.trim().parse().ok())?
        })
    }

    /// Bytes allocated by Envoy's heap (admin `/memory`, tcmalloc's `allocated`).
    pub fn memory_allocated(&self) -> u64 {
        let body = self.admin("/memory").1;
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("admin /memory is not JSON ({e}): {body}"));
        // Envoy renders 64-bit integers as JSON strings.
        match &v["allocated"] {
            Value::String(s) => s.parse().expect("allocated is a number"),
            Value::Number(n) => n.as_u64().expect("allocated is a number"),
            other => panic!("no allocated in /memory: {other}"),
        }
    }

    /// Envoy's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the Envoy process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain syscall; the group id is Envoy's pid (process_group(0)).
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
        if self.caller_dir {
            // The caller keeps or removes it with the rest of its files.
        } else if std::thread::panicking() {
            eprintln!("envoy config and log kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn new_temp_dir() -> PathBuf {
    crate::tempdir("e2e")
}
