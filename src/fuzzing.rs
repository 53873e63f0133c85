//! The bodies of the `cargo fuzz` targets in `fuzz/` (one function per target), kept here so the
//! targets and `tests/fuzz_regressions.rs` run exactly the same code on an input. Each feeds
//! outside input to the parser the process uses on it; none may panic, whatever the input.
//! Not an API.

use std::path::Path;

use mad_training::contract::{ModelMeta, META_KEY};
use mad_training::onnx::ModelProto;
use prost::Message as _;
use teloxide::types::UpdateKind;

use crate::config::Config;

/// A target's body: it returns whatever the input, or panics on a bug.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/` call it.
pub const TARGETS: &[(&str, Target)] = &[
    ("datasource_response", datasource_response),
    ("config_file", config_file),
    ("alert_payload", alert_payload),
    ("model_meta", model_meta),
    ("onnx_model", onnx_model),
    ("api_request", api_request),
    ("telegram_update", telegram_update),
];

/// The datasource's `query_range` answers: the scorer's and trainer's parser (with a success, a
/// client-error and an overload status) and the relay chart's.
pub fn datasource_response(body: &[u8]) {
    for status in [200, 400, 503] {
        let _ = crate::source::parse_query_range(status, body);
    }
    let _ = crate::chart::parse_range(body, "q");
}

/// The YAML config file, parsed and validated as `Config::load` does, then the settings every
/// detector derives from it.
pub fn config_file(data: &[u8]) {
    // `Config::load` reads the file as UTF-8 first.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text, Path::new("mad.yaml")) else {
        return;
    };
    for d in &config.detectors {
        let _ = (d.interval(), d.staleness(), d.alert_for());
        let _ = (d.episode_for(), d.episode_quiet(), d.describe_queries());
        let _ = (
            d.train_options(&config.training),
            d.search_budget(&config.training),
        );
    }
}

/// The relay's intake: vmalert's alert array and Alertmanager's webhook.
pub fn alert_payload(body: &[u8]) {
    if let Ok(alerts) = crate::relay::parse_alerts(body, 1_700_000_000) {
        for alert in &alerts {
            let _ = (alert.key(), alert.name());
        }
    }
}

/// A model's metadata as the loader reads it from the ONNX file's `mad.meta` entry
/// (`serde_json::from_str::<ModelMeta>`), and written back as training writes it. The loader's
/// `check_meta` that follows is private to `model::forecaster` and not reached.
pub fn model_meta(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(meta) = serde_json::from_str::<ModelMeta>(text) {
        let _ = serde_json::to_string(&meta);
    }
}

/// ONNX bytes decoded with the `ModelProto` messages of mad-training's exporter, and the
/// metadata entry in them parsed as the loader parses it. ONNX Runtime's own parsing of the
/// bytes (C++, behind `Forecaster::load`) is not reached.
pub fn onnx_model(data: &[u8]) {
    let Ok(model) = ModelProto::decode(data) else {
        return;
    };
    for entry in &model.metadata_props {
        if entry.key.as_deref() == Some(META_KEY) {
            if let Some(value) = entry.value.as_deref() {
                model_meta(value.as_bytes());
            }
        }
    }
    let _ = model.encode_to_vec();
}

/// Management API requests: the first line is `METHOD /api/v1/...?query`, the rest the body.
/// Route, method, query parameters and body go through the checks the handlers run before the
/// database or the datasource is asked.
pub fn api_request(data: &[u8]) {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (line, body) = data.split_at(split);
    let body = body.get(1..).unwrap_or_default();
    // hyper hands the handler a method and a request-target that are text.
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    let (method, target) = line.split_once(' ').unwrap_or((line, ""));
    let _ = crate::api::check_request(method, target, body);
}

/// `getUpdates` answers as the relay's bot reads them (`relay::parse_updates`, teloxide's
/// `Update` per update), and what the bot then reads from each: button data, commands, the
/// acting user's name.
pub fn telegram_update(data: &[u8]) {
    let Ok(batch) = crate::relay::parse_updates(data) else {
        return;
    };
    for update in &batch.updates {
        match &update.kind {
            UpdateKind::CallbackQuery(q) => {
                if let Some(message) = q.message.as_ref() {
                    let _ = (message.chat().id.0, message.id());
                }
                let _ = crate::relay::button_action(q.data.as_deref());
                let _ = crate::relay::escape_html(&crate::relay::user_name(&q.from));
            }
            UpdateKind::Message(m) => {
                if let Some(text) = m.text() {
                    let _ = crate::relay::chat_command(text);
                }
                let _ = (m.chat.id.0, m.from.as_ref().map(crate::relay::user_name));
            }
            _ => {}
        }
    }
}
