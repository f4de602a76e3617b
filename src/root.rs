//! Per VM: read and check the plugin configuration, set up the bucket table and the
//! metrics, build what every request needs, and flush the metrics on each tick.

use std::rc::Rc;
use std::time::Duration;

use log::{error, info};
use meshlimit_core::config::{self, Config};
use meshlimit_core::{headers, table};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::host::{self, EnvoySharedData};
use crate::http::RateLimitHttp;
use crate::metrics;

/// What every request of this VM needs, built once per configuration.
pub struct Plugin {
    pub config: Config,
    /// `RateLimit-Policy` value of each rule (same index as `config.rules`).
    pub policies: Vec<String>,
}

#[derive(Default)]
pub struct Root {
    plugin: Option<Rc<Plugin>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = host::plugin_configuration();
        let config = match config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                // The one line an operator needs: field path and reason.
                error!("configuration refused: {e}");
                metrics::config_error();
                return false;
            }
        };
        metrics::define();
        table::create(&EnvoySharedData, config.sets);
        let policies = config.rules.iter().map(headers::policy_header).collect();
        info!(
            "configured {} rules, {} bucket sets",
            config.rules.len(),
            config.sets
        );
        self.plugin = Some(Rc::new(Plugin { config, policies }));
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
