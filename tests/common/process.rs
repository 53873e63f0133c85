//! Child processes of the real components (vmalert, Alertmanager, `mad` itself), killed when
//! the test ends however it ends, with their output kept for the failure message.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct Process {
    pub child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Process {
    pub fn spawn(name: &'static str, command: &mut Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).expect("log file");
        let stderr = file.try_clone().expect("log file");
        let child = command
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e} (scripts/setup.sh installs it)"));
        Process { child, name, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap: a crash, with nothing flushed or shut down.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of its output, named.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} log ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// Waits until `url` answers 2xx; panics with the log if the process exits or 20 s pass.
    pub async fn wait_ok(&mut self, url: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if reqwest::get(url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}\n{}", self.name, self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready at {url}\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
