//! What `mad serve` shows the world: the `/metrics` exposition (scores and self-monitoring) and
//! the HTTP server that serves it with health and readiness probes.

mod render;
mod server;
mod telemetry;

pub use render::{
    escape_label_value, exposed_labels, Exposition, Family, CONTRIBUTION, DETECTOR_LABEL, FAMILIES,
    SCORE,
};
pub use server::{serve_http, ApiHandler, Probes};
pub use telemetry::Telemetry;
