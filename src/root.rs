//! Per VM: read and check the plugin configuration, set up the bucket table and the
//! metrics, build what every request needs, and flush the metrics on each tick.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use log::{error, info};
use meshlimit_core::config::{self, Config, ConfigError};
use meshlimit_core::global::{RuleParams, SyncView};
use meshlimit_core::report::{CandidateSet, TriggerParams};
use meshlimit_core::{headers, table};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::host::{self, EnvoySharedData};
use crate::http::RateLimitHttp;
use crate::metrics;
use crate::service::Companion;
use crate::sync::Syncer;

/// What every request of this VM needs, built once per configuration.
pub struct Plugin {
    pub config: Config,
    /// `RateLimit-Policy` value of each rule (same index as `config.rules`).
    pub policies: Vec<String>,
    /// The companion, when some rule is global or strict.
    pub companion: Option<Companion>,
    /// How each global rule decides (same index as `config.rules`; unused for others).
    pub rule_params: Vec<RuleParams>,
    /// This VM's global-scope state, when some rule talks to the companion.
    pub vm: Option<VmState>,
}

/// Candidates a VM holds between two ticks (merged into the proxy's outbox on each
/// tick; beyond this many keys, new ones are dropped and counted).
pub const CANDIDATES_PER_VM: usize = 4096;

/// What the request path of one VM reads and writes for global rules, in VM memory:
/// the proxy's sync state (refreshed from shared data on each tick) and the keys to
/// report.
pub struct VmState {
    pub sync: Cell<SyncView>,
    pub candidates: RefCell<CandidateSet>,
}

#[derive(Default)]
pub struct Root {
    plugin: Option<Rc<Plugin>>,
    /// This VM's part in the sync with the companion.
    syncer: Option<Syncer>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body: usize, _: usize) {
        if let (Some(syncer), Some(plugin)) = (&mut self.syncer, &self.plugin) {
            syncer.on_answer(plugin, token, body);
        }
    }
}

/// Refuses a configuration: the one line an operator needs, field path and reason.
fn refuse(e: ConfigError) -> bool {
    error!("configuration refused: {e}");
    metrics::config_error();
    false
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = host::plugin_configuration();
        let config = match config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => return refuse(e),
        };
        let companion = match &config.service {
            Some(service) if config.uses_service() => match Companion::resolve(service) {
                Ok(c) => Some(c),
                Err(e) => return refuse(e),
            },
            _ => None,
        };
        metrics::define();
        table::create(&EnvoySharedData, config.sets);
        self.syncer = None;
        if let Some(c) = &companion {
            // The first heartbeat is also the check that Envoy has the cluster: a
            // callout to a cluster it does not have is refused at once.
            match Syncer::start(c, host::now_ns()) {
                Ok(s) => self.syncer = Some(s),
                Err(()) => {
                    return refuse(ConfigError {
                        path: "service.cluster".into(),
                        reason: format!(
                            "Envoy has no cluster {:?} (a callout to it was refused): define it in the bootstrap, or under Istio use outbound|<port>||<host>",
                            c.cluster
                        ),
                    })
                }
            }
        }
        let policies = config.rules.iter().map(headers::policy_header).collect();
        let interval_ns = companion
            .as_ref()
            .map_or(1_000_000_000, |c| c.interval.as_nanos() as u64);
        let rule_params = (config.rules.iter())
            .map(|r| RuleParams {
                mode: r.failure_mode,
                fallback_share: companion.as_ref().and_then(|c| c.fallback_share),
                trigger: TriggerParams::for_interval(interval_ns),
            })
            .collect();
        let vm = companion.as_ref().map(|_| VmState {
            sync: Cell::new(SyncView {
                last_ok_sent_ns: None,
                proxy_ttl_ns: 3 * interval_ns,
                n_live: 0,
            }),
            candidates: RefCell::new(CandidateSet::with_capacity(CANDIDATES_PER_VM)),
        });
        info!(
            "configured {} rules, {} bucket sets",
            config.rules.len(),
            config.sets
        );
        // Global rules: ticks several times an interval, so that candidates reach the
        // outbox and every VM's view of the sync state is fresh well within one.
        let tick = companion.as_ref().map_or(Duration::from_secs(1), |c| {
            (c.interval / 4).clamp(Duration::from_millis(25), Duration::from_millis(250))
        });
        self.plugin = Some(Rc::new(Plugin {
            config,
            policies,
            companion,
            rule_params,
            vm,
        }));
        host::set_tick_period(tick);
        true
    }

    fn on_tick(&mut self) {
        if let (Some(syncer), Some(plugin)) = (&mut self.syncer, &self.plugin) {
            syncer.tick(plugin, host::now_ns());
        }
        metrics::flush();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.clone()?;
        Some(Box::new(RateLimitHttp::new(plugin)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
