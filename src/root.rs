//! Per VM: read and check the plugin configuration, set up the bucket table and the
//! metrics, build what every request needs, and flush the metrics on each tick.

use std::rc::Rc;
use std::time::Duration;

use log::{error, info};
use meshlimit_core::config::{self, Config, ConfigError};
use meshlimit_core::{headers, table};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::host::{self, EnvoySharedData};
use crate::http::RateLimitHttp;
use crate::metrics;
use crate::service::Companion;

/// What every request of this VM needs, built once per configuration.
pub struct Plugin {
    pub config: Config,
    /// `RateLimit-Policy` value of each rule (same index as `config.rules`).
    pub policies: Vec<String>,
    /// The companion, when some rule is global or strict.
    pub companion: Option<Companion>,
}

#[derive(Default)]
pub struct Root {
    plugin: Option<Rc<Plugin>>,
    /// The callout `on_configure` sent to find out whether the companion's cluster
    /// exists; its answer is of no further use.
    probe: Option<u32>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, _body: usize, _: usize) {
        if self.probe == Some(token) {
            self.probe = None;
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
            Some(service) if config.uses_service() => {
                let companion = match Companion::resolve(service) {
                    Ok(c) => c,
                    Err(e) => return refuse(e),
                };
                match companion.probe() {
                    Ok(token) => self.probe = Some(token),
                    Err(e) => return refuse(e),
                }
                Some(companion)
            }
            _ => None,
        };
        metrics::define();
        table::create(&EnvoySharedData, config.sets);
        let policies = config.rules.iter().map(headers::policy_header).collect();
        info!(
            "configured {} rules, {} bucket sets",
            config.rules.len(),
            config.sets
        );
        self.plugin = Some(Rc::new(Plugin {
            config,
            policies,
            companion,
        }));
        host::set_tick_period(Duration::from_secs(1));
        true
    }

    fn on_tick(&mut self) {
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
