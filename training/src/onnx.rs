//! ONNX export of a trained LSTM forecaster.
//!
//! The protobuf messages are written by hand from the field numbers in the ONNX specification
//! (`onnx.proto`, proto2) with only the fields we use, so no `protoc` or generated code is needed.
//! The graph uses the standard `LSTM` operator, which ONNX Runtime runs with a fused kernel, and
//! exposes its initial and final states so callers can carry state between calls.

use prost::Message;

use crate::contract::{
    ModelMeta, INPUT_C, INPUT_H, INPUT_X, META_KEY, OUTPUT_C, OUTPUT_H, OUTPUT_YHAT,
};
use crate::lstm::LstmParams;

/// ONNX IR version written; ONNX Runtime 1.31 accepts up to 13.
pub const IR_VERSION: i64 = 8;
/// Default-domain opset: `Squeeze` takes its axes as an input from 13 on.
pub const OPSET_VERSION: i64 = 17;
pub const PRODUCER_NAME: &str = "mad";

/// `TensorProto.DataType` values used here.
pub const DATA_TYPE_FLOAT: i32 = 1;
pub const DATA_TYPE_INT64: i32 = 7;
/// `AttributeProto.AttributeType.INT`.
pub const ATTRIBUTE_TYPE_INT: i32 = 2;

/// Names of the symbolic dimensions of the graph inputs and outputs.
pub const DIM_SEQ: &str = "seq";
pub const DIM_BATCH: &str = "batch";

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, optional, tag = "1")]
    pub ir_version: Option<i64>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(string, optional, tag = "2")]
    pub producer_name: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub producer_version: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub doc_string: Option<String>,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, optional, tag = "1")]
    pub domain: Option<String>,
    #[prost(int64, optional, tag = "2")]
    pub version: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct StringStringEntryProto {
    #[prost(string, optional, tag = "1")]
    pub key: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, optional, tag = "2")]
    pub name: Option<String>,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(string, optional, tag = "10")]
    pub doc_string: Option<String>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "13")]
    pub value_info: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, optional, tag = "3")]
    pub name: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub op_type: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub domain: Option<String>,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, optional, tag = "6")]
    pub doc_string: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(int32, optional, tag = "20")]
    pub r#type: Option<i32>,
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub s: Option<Vec<u8>>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(float, repeated, packed = "false", tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, packed = "false", tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, optional, tag = "2")]
    pub data_type: Option<i32>,
    #[prost(float, repeated, packed = "true", tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int64, repeated, packed = "true", tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, optional, tag = "8")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "9")]
    pub raw_data: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
    #[prost(string, optional, tag = "3")]
    pub doc_string: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(oneof = "type_proto::Value", tags = "1")]
    pub value: Option<type_proto::Value>,
    #[prost(string, optional, tag = "6")]
    pub denotation: Option<String>,
}

pub mod type_proto {
    use super::TensorShapeProto;

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(message, tag = "1")]
        TensorType(Tensor),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tensor {
        #[prost(int32, optional, tag = "1")]
        pub elem_type: Option<i32>,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<TensorShapeProto>,
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<tensor_shape_proto::Dimension>,
}

pub mod tensor_shape_proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(oneof = "dimension::Value", tags = "1, 2")]
        pub value: Option<dimension::Value>,
        #[prost(string, optional, tag = "3")]
        pub denotation: Option<String>,
    }

    pub mod dimension {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(int64, tag = "1")]
            DimValue(i64),
            #[prost(string, tag = "2")]
            DimParam(String),
        }
    }
}

/// A graph input/output dimension.
enum Dim {
    Fixed(usize),
    Named(&'static str),
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    use tensor_shape_proto::{dimension, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Named(s) => dimension::Value::DimParam((*s).to_owned()),
            }),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_owned()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DATA_TYPE_FLOAT),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        doc_string: None,
    }
}

fn float_tensor(name: &str, dims: &[usize], values: impl IntoIterator<Item = f32>) -> TensorProto {
    let raw: Vec<u8> = values.into_iter().flat_map(f32::to_le_bytes).collect();
    debug_assert_eq!(raw.len(), dims.iter().product::<usize>() * 4);
    TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DATA_TYPE_FLOAT),
        name: Some(name.to_owned()),
        raw_data: Some(raw),
        ..Default::default()
    }
}

fn int64_tensor(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        dims: vec![values.len() as i64],
        data_type: Some(DATA_TYPE_INT64),
        name: Some(name.to_owned()),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn node(op_type: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: outputs.iter().map(|s| (*s).to_owned()).collect(),
        name: Some(name.to_owned()),
        op_type: Some(op_type.to_owned()),
        ..Default::default()
    }
}

fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_owned()),
        r#type: Some(ATTRIBUTE_TYPE_INT),
        i: Some(value),
        ..Default::default()
    }
}

/// The metadata a model carries (its `mad.meta` entry), read without ONNX Runtime: what the
/// trainer needs to know about the model it may replace.
pub fn embedded_meta(onnx: &[u8]) -> Result<ModelMeta, String> {
    let model = ModelProto::decode(onnx).map_err(|e| format!("not an ONNX model: {e}"))?;
    let entry = model
        .metadata_props
        .iter()
        .find(|entry| entry.key.as_deref() == Some(META_KEY))
        .and_then(|entry| entry.value.as_deref())
        .ok_or_else(|| format!("no {META_KEY:?} metadata entry"))?;
    serde_json::from_str(entry).map_err(|e| format!("metadata {META_KEY:?} is not valid: {e}"))
}

/// The weights of a model [`export`] wrote, read back without ONNX Runtime: what a retrain
/// continues from. Anything else (another producer's graph, a truncated file, tensors whose
/// shapes do not fit together) is an error, never a model with made-up weights.
pub fn read_params(onnx: &[u8]) -> Result<LstmParams<f32>, String> {
    let model = ModelProto::decode(onnx).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = model.graph.ok_or("the model has no graph")?;
    let tensor = |name: &str| -> Result<(Vec<usize>, Vec<f32>), String> {
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some(name))
            .ok_or_else(|| format!("no {name:?} tensor: not a model MAD wrote"))?;
        let dims = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("{name:?} has a negative dimension")))
            .collect::<Result<Vec<_>, _>>()?;
        let raw = t.raw_data.as_deref().unwrap_or_default();
        let expected = dims.iter().try_fold(4usize, |n, &d| n.checked_mul(d));
        if t.data_type != Some(DATA_TYPE_FLOAT) || expected != Some(raw.len()) {
            return Err(format!("{name:?} is not float data of its shape {dims:?}"));
        }
        let values = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((dims, values))
    };
    let (w_dims, _) = tensor("lstm_W")?;
    let (head_dims, head_w) = tensor("head_W")?;
    let (features, hidden, outputs) = match (w_dims.as_slice(), head_dims.as_slice()) {
        ([1, gates, f], [h, o]) if *gates == 4 * h => (*f, *h, *o),
        _ => {
            return Err(format!(
                "tensor shapes {w_dims:?} and {head_dims:?} do not fit"
            ))
        }
    };
    let layers = (1..)
        .take_while(|l| {
            graph
                .initializer
                .iter()
                .any(|t| t.name.as_deref() == Some(&format!("lstm{l}_W")))
        })
        .count()
        + 1;
    let mut data = Vec::new();
    for layer in 0..layers {
        let prefix = if layer == 0 {
            "lstm".to_owned()
        } else {
            format!("lstm{layer}")
        };
        for part in ["W", "R", "B"] {
            data.extend(tensor(&format!("{prefix}_{part}"))?.1);
        }
    }
    // Stored `[H, outputs]` for MatMul; the parameters hold `[outputs, H]`.
    data.extend(
        (0..outputs)
            .flat_map(|o| (0..hidden).map(move |k| (o, k)))
            .map(|(o, k)| head_w[k * outputs + o]),
    );
    data.extend(tensor("head_B")?.1);
    let mut params = LstmParams::zeros_multi(features, hidden, layers, outputs);
    if params.as_slice().len() != data.len() {
        return Err(format!(
            "{} weights where a {layers}-layer LSTM of {hidden} units over {features} features \
             has {}",
            data.len(),
            params.as_slice().len()
        ));
    }
    params.as_mut_slice().copy_from_slice(&data);
    Ok(params)
}

/// Serialises `params` and `meta` as an ONNX model following the model contract: inputs
/// `x [seq, batch, F]`, `h0`/`c0 [layers, batch, H]`; outputs `yhat [seq, batch]` (a joint
/// model's `[seq, batch, outputs]`), `h`/`c [layers, batch, H]`. Each layer is one standard
/// `LSTM` node; with several, the state is split per layer on the way in and concatenated on
/// the way out.
pub fn export(params: &LstmParams<f32>, meta: &ModelMeta) -> Vec<u8> {
    let (f, h, layers) = (params.features(), params.hidden(), params.layers());
    let mut initializer = vec![int64_tensor("squeeze_dirs_axes", &[1])];
    let mut nodes = Vec::new();
    // One layer keeps the graph it always had: the state goes straight in and out.
    let state_name = |base: &str, layer: usize| {
        if layers == 1 {
            base.to_owned()
        } else {
            format!("{base}_{layer}")
        }
    };
    if layers > 1 {
        for (input, base) in [(INPUT_H, INPUT_H), (INPUT_C, INPUT_C)] {
            let outputs: Vec<String> = (0..layers).map(|l| state_name(base, l)).collect();
            let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
            let mut split = node("Split", &format!("split_{base}"), &[input], &outputs);
            split.attribute.push(int_attribute("axis", 0));
            nodes.push(split);
        }
    }
    let mut layer_input = INPUT_X.to_owned();
    for layer in 0..layers {
        // Layer 0 keeps the names a one-layer model always had.
        let suffix = if layer == 0 {
            String::new()
        } else {
            layer.to_string()
        };
        let prefix = format!("lstm{suffix}");
        let inputs = params.layer_inputs(layer);
        let mut bias = params.wb(layer).to_vec();
        bias.extend_from_slice(params.rb(layer));
        let (w, r, b) = (
            format!("{prefix}_W"),
            format!("{prefix}_R"),
            format!("{prefix}_B"),
        );
        initializer.push(float_tensor(
            &w,
            &[1, 4 * h, inputs],
            params.w(layer).iter().copied(),
        ));
        initializer.push(float_tensor(
            &r,
            &[1, 4 * h, h],
            params.r(layer).iter().copied(),
        ));
        initializer.push(float_tensor(&b, &[1, 8 * h], bias));
        let (h0, c0) = (state_name(INPUT_H, layer), state_name(INPUT_C, layer));
        let (h_out, c_out) = (state_name(OUTPUT_H, layer), state_name(OUTPUT_C, layer));
        let y = format!("{prefix}_Y");
        let mut lstm = node(
            "LSTM",
            &prefix,
            &[&layer_input, &w, &r, &b, "", &h0, &c0],
            &[&y, &h_out, &c_out],
        );
        lstm.attribute.push(int_attribute("hidden_size", h as i64));
        nodes.push(lstm);
        // Y is [seq, num_directions = 1, batch, H].
        let hidden_seq = format!("hidden_seq{suffix}");
        nodes.push(node(
            "Squeeze",
            &format!("squeeze_dirs{suffix}"),
            &[&y, "squeeze_dirs_axes"],
            &[&hidden_seq],
        ));
        layer_input = hidden_seq;
    }
    if layers > 1 {
        for base in [OUTPUT_H, OUTPUT_C] {
            let inputs: Vec<String> = (0..layers).map(|l| state_name(base, l)).collect();
            let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            let mut concat = node("Concat", &format!("concat_{base}"), &inputs, &[base]);
            concat.attribute.push(int_attribute("axis", 0));
            nodes.push(concat);
        }
    }
    // The head is stored `[outputs, H]`; MatMul wants `[H, outputs]`.
    let outputs = params.outputs();
    let head_w = params.head_w();
    initializer.push(float_tensor(
        "head_W",
        &[h, outputs],
        (0..h).flat_map(|k| (0..outputs).map(move |o| head_w[o * h + k])),
    ));
    initializer.push(float_tensor(
        "head_B",
        &[outputs],
        params.head_b().iter().copied(),
    ));
    nodes.push(node(
        "MatMul",
        "head_matmul",
        &[&layer_input, "head_W"],
        &["head_product"],
    ));
    let yhat_dims = if outputs == 1 {
        // A one-output model keeps its `[seq, batch]` forecasts.
        initializer.push(int64_tensor("squeeze_out_axes", &[2]));
        nodes.extend([
            node(
                "Add",
                "head_bias",
                &["head_product", "head_B"],
                &["head_out"],
            ),
            node(
                "Squeeze",
                "squeeze_out",
                &["head_out", "squeeze_out_axes"],
                &[OUTPUT_YHAT],
            ),
        ]);
        vec![Dim::Named(DIM_SEQ), Dim::Named(DIM_BATCH)]
    } else {
        nodes.push(node(
            "Add",
            "head_bias",
            &["head_product", "head_B"],
            &[OUTPUT_YHAT],
        ));
        vec![
            Dim::Named(DIM_SEQ),
            Dim::Named(DIM_BATCH),
            Dim::Fixed(outputs),
        ]
    };
    let state = [Dim::Fixed(layers), Dim::Named(DIM_BATCH), Dim::Fixed(h)];
    let graph = GraphProto {
        node: nodes,
        name: Some("mad_lstm_forecaster".to_owned()),
        initializer,
        input: vec![
            value_info(
                INPUT_X,
                &[Dim::Named(DIM_SEQ), Dim::Named(DIM_BATCH), Dim::Fixed(f)],
            ),
            value_info(INPUT_H, &state),
            value_info(INPUT_C, &state),
        ],
        output: vec![
            value_info(OUTPUT_YHAT, &yhat_dims),
            value_info(OUTPUT_H, &state),
            value_info(OUTPUT_C, &state),
        ],
        ..Default::default()
    };
    // ModelMeta is plain data (strings, numbers, maps with string keys); serialising it cannot fail.
    let meta_json = serde_json::to_string(meta).unwrap_or_default();
    let model = ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET_VERSION),
        }],
        producer_name: Some(PRODUCER_NAME.to_owned()),
        producer_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        doc_string: Some("MAD LSTM forecaster; see docs/model-contract.md".to_owned()),
        graph: Some(graph),
        metadata_props: vec![StringStringEntryProto {
            key: Some(META_KEY.to_owned()),
            value: Some(meta_json),
        }],
    };
    model.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::contract::{Feature, CONTRACT_VERSION};

    fn meta(hidden: usize) -> ModelMeta {
        ModelMeta {
            contract_version: CONTRACT_VERSION,
            detector: "cpu".into(),
            features: Feature::DEFAULT.to_vec(),
            inputs: Vec::new(),
            hidden,
            layers: 1,
            step_secs: 60,
            window: 64,
            series: BTreeMap::new(),
            default_band: 0.5,
            train_start: 0,
            train_end: 1,
            trained_at: 2,
            training: BTreeMap::new(),
        }
    }

    #[test]
    fn a_joint_model_forecasts_every_input_without_the_final_squeeze() {
        let (f, h, k) = (7, 6, 3);
        let params = LstmParams::<f32>::init_multi(f, h, 1, k, 1);
        let bytes = export(&params, &meta(h));
        let graph = ModelProto::decode(bytes.as_slice())
            .expect("valid protobuf")
            .graph
            .expect("graph");
        let ops: Vec<_> = graph
            .node
            .iter()
            .filter_map(|n| n.op_type.as_deref())
            .collect();
        assert_eq!(ops, ["LSTM", "Squeeze", "MatMul", "Add"]);
        let head = graph
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some("head_W"))
            .expect("head_W");
        assert_eq!(head.dims, [h as i64, k as i64]);
        // Stored `[outputs, H]`, exported `[H, outputs]`: element (k', o) is output o's weight k'.
        let raw = head.raw_data.as_deref().expect("raw data");
        let at = |kk: usize, o: usize| {
            let i = (kk * k + o) * 4;
            f32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]])
        };
        assert_eq!(at(2, 1), params.head_w()[h + 2]);
        let yhat = &graph.output[0];
        let Some(TypeProto {
            value: Some(type_proto::Value::TensorType(tensor)),
            ..
        }) = &yhat.r#type
        else {
            panic!("yhat is a tensor");
        };
        let dims = &tensor.shape.as_ref().expect("shape").dim;
        assert_eq!(dims.len(), 3);
        assert_eq!(
            dims[2].value,
            Some(tensor_shape_proto::dimension::Value::DimValue(k as i64))
        );
    }

    #[test]
    fn export_decodes_with_expected_structure() {
        let (f, h) = (5, 6);
        let params = LstmParams::<f32>::init(f, h, 1);
        let bytes = export(&params, &meta(h));
        let model = ModelProto::decode(bytes.as_slice()).expect("valid protobuf");
        assert!(model.ir_version.unwrap() <= 13);
        assert_eq!(model.opset_import[0].version, Some(17));
        assert_eq!(model.producer_name.as_deref(), Some("mad"));
        let graph = model.graph.expect("graph");
        let ops: Vec<_> = graph
            .node
            .iter()
            .filter_map(|n| n.op_type.as_deref())
            .collect();
        assert_eq!(ops, ["LSTM", "Squeeze", "MatMul", "Add", "Squeeze"]);
        assert_eq!(graph.node[0].input[4], "");
        assert_eq!(graph.node[0].attribute[0].i, Some(h as i64));
        let shapes: BTreeMap<_, _> = graph
            .initializer
            .iter()
            .map(|t| (t.name.clone().unwrap(), t.dims.clone()))
            .collect();
        assert_eq!(shapes["lstm_W"], [1, 4 * h as i64, f as i64]);
        assert_eq!(shapes["lstm_R"], [1, 4 * h as i64, h as i64]);
        assert_eq!(shapes["lstm_B"], [1, 8 * h as i64]);
        assert_eq!(shapes["head_W"], [h as i64, 1]);
        let w = graph
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some("lstm_W"))
            .expect("lstm_W");
        assert_eq!(w.raw_data.as_ref().unwrap().len(), 4 * 4 * h * f);
        let names: Vec<_> = graph
            .input
            .iter()
            .filter_map(|v| v.name.as_deref())
            .collect();
        assert_eq!(names, ["x", "h0", "c0"]);
        let outputs: Vec<_> = graph
            .output
            .iter()
            .filter_map(|v| v.name.as_deref())
            .collect();
        assert_eq!(outputs, ["yhat", "h", "c"]);
        let entry = &model.metadata_props[0];
        assert_eq!(entry.key.as_deref(), Some(META_KEY));
        let decoded: ModelMeta = serde_json::from_str(entry.value.as_deref().unwrap()).unwrap();
        assert_eq!(decoded, meta(h));
        assert_eq!(embedded_meta(&bytes), Ok(meta(h)));
        assert!(embedded_meta(&bytes[..bytes.len() / 2]).is_err());
    }

    #[test]
    fn read_params_gives_back_the_exported_weights() {
        for (layers, outputs) in [(1, 1), (2, 1), (1, 3), (3, 2)] {
            let params = LstmParams::<f32>::init_multi(5, 6, layers, outputs, 7);
            let bytes = export(&params, &meta(6));
            assert_eq!(
                read_params(&bytes),
                Ok(params),
                "{layers} layers, {outputs} outputs"
            );
        }
    }

    #[test]
    fn read_params_refuses_what_it_cannot_read_whole() {
        let bytes = export(&LstmParams::<f32>::init(5, 6, 7), &meta(6));
        assert!(read_params(&bytes[..bytes.len() / 2]).is_err());
        assert!(read_params(b"not a model").is_err());
        let mut model = ModelProto::decode(bytes.as_slice()).expect("valid protobuf");
        let graph = model.graph.as_mut().expect("graph");
        let head = graph
            .initializer
            .iter_mut()
            .find(|t| t.name.as_deref() == Some("head_B"))
            .expect("head_B");
        head.raw_data.as_mut().expect("raw").pop();
        let error = read_params(&model.encode_to_vec()).expect_err("a short tensor");
        assert!(error.contains("head_B"), "{error}");
        graph_without(&mut model, "lstm_R");
        let error = read_params(&model.encode_to_vec()).expect_err("a missing tensor");
        assert!(error.contains("lstm_R"), "{error}");
    }

    fn graph_without(model: &mut ModelProto, name: &str) {
        if let Some(graph) = model.graph.as_mut() {
            graph
                .initializer
                .retain(|t| t.name.as_deref() != Some(name));
        }
    }
}
