//! `mad serve` in the test process, stopped on request.

use std::path::Path;

use mad::config::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::pg::TestDb;

pub struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Starts `mad serve` with `config`; it runs until [`Serving::stop`].
pub fn start(config: Config) -> Serving {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(mad::serve::run(config, async {
        let _ = stopped.await;
    }));
    Serving { stop, task }
}

/// `mad serve` (and its port) with models in `db` and no datasource: what registry tests watch.
pub fn from_db(db: &TestDb, reload_interval: &str) -> (Serving, u16) {
    let port = mad::demo::free_port().expect("port");
    let closed = mad::demo::free_port().expect("port");
    let text = format!(
        r#"
datasource: {{ url: "http://127.0.0.1:{closed}", retries: 0, timeout: 1s }}
store: {{ postgres: "{}" }}
server: {{ listen: "127.0.0.1:{port}", reload_interval: {reload_interval} }}
detectors:
  - {{ name: cpu, query: up, step: 1m, window: 8, train_range: 1d }}
"#,
        db.url
    );
    let config = Config::parse(&text, Path::new("pg.yaml")).expect("config");
    (start(config), port)
}

impl Serving {
    /// Asks for a graceful shutdown and waits for it; panics if serving failed.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("mad serve failed: {e:#}"),
            Err(e) => panic!("mad serve task: {e}"),
        }
    }
}
