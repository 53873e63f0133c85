//! A model that breaks the contract is refused at load time with a reason, never at scoring time.

mod common;

use mad::model::{Forecaster, ModelError};

fn rejection(bytes: &[u8], detector: &str) -> String {
    match Forecaster::load(bytes, "v9", detector, None) {
        Ok(_) => panic!("the model should have been rejected"),
        Err(e @ ModelError::Invalid { .. }) => e.to_string(),
        Err(other) => panic!("expected a contract rejection, got {other}"),
    }
}

#[test]
fn a_valid_model_loads_and_runs() {
    let model = common::forecaster("cpu", 1.0);
    assert_eq!(model.features(), 5);
    assert_eq!(model.hidden(), common::HIDDEN);
    let state = vec![0.0; 2 * common::HIDDEN];
    let out = model
        .run(&[0.5; 3 * 2 * 5], 3, 2, &state, &state)
        .expect("runs");
    assert_eq!(out.yhat.len(), 6);
}

#[test]
fn garbage_and_truncated_files_are_rejected() {
    let e = rejection(b"definitely not onnx", "cpu");
    assert!(
        e.contains("ONNX Runtime cannot load it") && e.contains("v9"),
        "{e}"
    );
    let bytes = common::model_bytes(&common::meta("cpu", 1.0));
    let e = rejection(&bytes[..bytes.len() / 2], "cpu");
    assert!(e.contains("rejected"), "{e}");
}

#[test]
fn a_model_for_another_detector_is_rejected() {
    let bytes = common::model_bytes(&common::meta("memory", 1.0));
    let e = rejection(&bytes, "cpu");
    assert!(e.contains("trained for detector \"memory\""), "{e}");
}

#[test]
fn metadata_that_disagrees_with_the_graph_is_rejected() {
    let mut meta = common::meta("cpu", 1.0);
    let bytes = common::model_bytes(&meta);
    meta.hidden = common::HIDDEN * 2;
    // Same graph, metadata claiming another hidden size.
    let lying = mad_training::onnx::export(&common::params(), &meta);
    assert_ne!(bytes, lying);
    let e = rejection(&lying, "cpu");
    assert!(e.contains("\"h0\" dimension 2"), "{e}");
}

#[test]
fn unusable_calibration_and_unknown_contract_versions_are_rejected() {
    let mut meta = common::meta("cpu", 0.0);
    let e = rejection(&common::model_bytes(&meta), "cpu");
    assert!(e.contains("default_band"), "{e}");
    meta.default_band = 1.0;
    meta.contract_version = 99;
    let e = rejection(&common::model_bytes(&meta), "cpu");
    assert!(e.contains("contract version 99"), "{e}");
}

#[test]
fn metadata_with_impossible_times_or_sizes_is_rejected() {
    type Edit = fn(&mut mad_training::contract::ModelMeta);
    let cases: [(&str, Edit); 4] = [
        ("trained_at", |m| m.trained_at = i64::MAX),
        ("the start not after the end", |m| {
            m.train_start = m.train_end + 1
        }),
        ("step_secs", |m| m.step_secs = u64::MAX),
        ("beyond what this exporter loads", |m| m.window = usize::MAX),
    ];
    for (reason, edit) in cases {
        let mut meta = common::meta("cpu", 1.0);
        edit(&mut meta);
        let e = rejection(&common::model_bytes(&meta), "cpu");
        assert!(e.contains(reason), "{reason}: {e}");
    }
}

#[test]
fn a_weekly_profile_of_the_wrong_shape_is_rejected() {
    use mad_training::contract::{Scaler, SeriesCalibration};
    use mad_training::weekly::{Strength, WeeklySeed};
    let mut meta = common::meta("cpu", 1.0);
    let seed = WeeklySeed {
        week: vec![1.0; 24],
        week_points: vec![60; 24],
        day: vec![1.0; 24],
        day_points: vec![60; 24],
        strength: Strength::default(),
        learnt_until: 0,
    };
    meta.series.insert(
        r#"{"instance":"a"}"#.into(),
        SeriesCalibration {
            scaler: Scaler {
                center: 0.0,
                scale: 1.0,
            },
            band: 1.0,
            range: None,
            fitted_until: None,
            weekly: Some(seed),
        },
    );
    let e = rejection(&common::model_bytes(&meta), "cpu");
    assert!(
        e.contains(r#"weekly profile of series {"instance":"a"} is not usable: 24 and 24 hours"#),
        "{e}"
    );
}

/// Re-encodes a model after `edit` changes its protobuf.
fn edited(edit: impl FnOnce(&mut mad_training::onnx::ModelProto)) -> Vec<u8> {
    use prost::Message;
    let bytes = common::model_bytes(&common::meta("cpu", 1.0));
    let mut model = mad_training::onnx::ModelProto::decode(bytes.as_slice()).expect("decodes");
    edit(&mut model);
    model.encode_to_vec()
}

#[test]
fn a_model_without_metadata_is_rejected() {
    let e = rejection(&edited(|m| m.metadata_props.clear()), "cpu");
    assert!(e.contains("metadata key \"mad.meta\" is missing"), "{e}");
    let e = rejection(
        &edited(|m| {
            for p in &mut m.metadata_props {
                p.value = Some("{not json".into());
            }
        }),
        "cpu",
    );
    assert!(e.contains("is not valid"), "{e}");
}

#[test]
fn a_model_with_other_input_names_is_rejected() {
    // A data scientist's export that calls its input "input" instead of "x".
    let e = rejection(
        &edited(|m| {
            if let Some(graph) = m.graph.as_mut() {
                for input in &mut graph.input {
                    if input.name.as_deref() == Some("x") {
                        input.name = Some("input".into());
                    }
                }
                for node in &mut graph.node {
                    for i in &mut node.input {
                        if i == "x" {
                            *i = "input".into();
                        }
                    }
                }
            }
        }),
        "cpu",
    );
    assert!(e.contains("input \"x\" is missing"), "{e}");
}
