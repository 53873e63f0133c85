//! The ONNX file the trainer writes must compute exactly what the trainer's own forward pass
//! computes, in ONNX Runtime, including carried LSTM state: the exporter relies on both.

use std::collections::BTreeMap;
use std::path::PathBuf;

use mad_training::{train, SeriesHistory, TrainOptions};
use ort::session::Session;
use ort::value::Tensor;

const TOLERANCE: f32 = 1e-4;

/// Deterministic uniform numbers without pulling `rand` into the root package (xorshift64*).
struct Uniform(u64);

impl Uniform {
    fn next(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        lo + (hi - lo) * (bits as f64 / (1u64 << 53) as f64)
    }
}

fn library_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ort/libonnxruntime.so");
    assert!(
        path.is_file(),
        "ONNX Runtime library missing at {}: run scripts/fetch-onnxruntime.sh first",
        path.display()
    );
    path
}

fn small_model(layers: usize) -> mad_training::TrainedModel {
    let step = 300i64;
    let start = 1_700_000_000 - 1_700_000_000 % step;
    let timestamps: Vec<i64> = (0..400).map(|i| start + i * step).collect();
    let mut rng = Uniform(4);
    let values = timestamps
        .iter()
        .map(|&ts| (ts as f64 / 3_600.0).sin() * 5.0 + 20.0 + rng.next(-0.5, 0.5))
        .collect();
    let history = SeriesHistory {
        labels: BTreeMap::from([("job".to_owned(), "parity".to_owned())]),
        timestamps,
        values,
    };
    let opts = TrainOptions {
        hidden: 8,
        layers,
        window: 16,
        max_epochs: 4,
        ..TrainOptions::default()
    };
    train("parity", step as u64, &[history], &opts, &mut |_| {}).expect("training succeeds")
}

struct OrtOutput {
    yhat: Vec<f32>,
    yhat_shape: Vec<i64>,
    h: Vec<f32>,
    c: Vec<f32>,
    state_shape: Vec<i64>,
}

fn run(
    session: &mut Session,
    x: &[f32],
    seq: usize,
    batch: usize,
    (features, layers): (usize, usize),
    h0: &[f32],
    c0: &[f32],
) -> OrtOutput {
    let state = [layers, batch, h0.len() / (layers * batch)];
    let inputs = ort::inputs![
        "x" => Tensor::from_array(([seq, batch, features], x.to_vec())).unwrap(),
        "h0" => Tensor::from_array((state, h0.to_vec())).unwrap(),
        "c0" => Tensor::from_array((state, c0.to_vec())).unwrap(),
    ];
    let outputs = session.run(inputs).expect("ONNX Runtime runs the model");
    let (yhat_shape, yhat) = outputs["yhat"].try_extract_tensor::<f32>().unwrap();
    let (state_shape, h) = outputs["h"].try_extract_tensor::<f32>().unwrap();
    let (_, c) = outputs["c"].try_extract_tensor::<f32>().unwrap();
    OrtOutput {
        yhat: yhat.to_vec(),
        yhat_shape: yhat_shape.iter().copied().collect(),
        h: h.to_vec(),
        c: c.to_vec(),
        state_shape: state_shape.iter().copied().collect(),
    }
}

fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= TOLERANCE, "{what}: max abs difference {worst}");
}

#[test]
fn exported_model_matches_rust_forward_and_carries_state() {
    check_parity(1);
}

#[test]
fn exported_stacked_model_matches_rust_forward_and_carries_state() {
    check_parity(2);
}

fn check_parity(layers: usize) {
    let env = ort::init_from(library_path())
        .expect("ONNX Runtime library loads")
        .with_name("onnx_parity")
        .build()
        .expect("environment builds");
    let model = small_model(layers);
    let mut session = Session::builder(&env)
        .and_then(|mut b| b.commit_from_memory(&model.onnx))
        .expect("ONNX Runtime accepts the exported model");

    let (seq, batch) = (50, 3);
    let features = model.params.features();
    let hidden = model.params.hidden();
    let mut rng = Uniform(9);
    let x: Vec<f32> = (0..seq * batch * features)
        .map(|_| rng.next(-2.0, 2.0) as f32)
        .collect();
    let h0: Vec<f32> = (0..layers * batch * hidden)
        .map(|_| rng.next(-0.5, 0.5) as f32)
        .collect();
    let c0: Vec<f32> = (0..layers * batch * hidden)
        .map(|_| rng.next(-0.5, 0.5) as f32)
        .collect();

    let rust = model
        .params
        .forward_f32(&x, seq, batch, &h0, &c0)
        .expect("shapes match");
    let full = run(&mut session, &x, seq, batch, (features, layers), &h0, &c0);
    assert_eq!(full.yhat_shape, [seq as i64, batch as i64]);
    assert_eq!(
        full.state_shape,
        [layers as i64, batch as i64, hidden as i64]
    );
    assert_close("yhat", &rust.yhat, &full.yhat);
    assert_close("h", &rust.h, &full.h);
    assert_close("c", &rust.c, &full.c);

    // 30 steps, then 20 more from the returned state, equals 50 at once.
    let split = 30;
    let first = run(
        &mut session,
        &x[..split * batch * features],
        split,
        batch,
        (features, layers),
        &h0,
        &c0,
    );
    let second = run(
        &mut session,
        &x[split * batch * features..],
        seq - split,
        batch,
        (features, layers),
        &first.h,
        &first.c,
    );
    let mut stitched = first.yhat.clone();
    stitched.extend_from_slice(&second.yhat);
    assert_close("yhat carried", &full.yhat, &stitched);
    assert_close("h carried", &full.h, &second.h);
    assert_close("c carried", &full.c, &second.c);
}
