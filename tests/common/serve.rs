//! `mad serve` in the test process, stopped on request.

use mad::config::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
