//! Checks that a pre-quantized checkpoint's packed tensors agree with its `quantization_config`:
//! a shape that contradicts a field is an error naming the tensor, its shape, the expected shape
//! and the field (docs/quantization.md, "Pre-quantized checkpoints").

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::{Model, Node, Tensor};
use crate::quant::{BnbBits, GroupConfig, QuantConfig};

/// Bytes per MXFP4 block (32 four-bit values) and elements per block.
const MXFP4_BLOCK_BYTES: u64 = 16;

/// The tensor `prefix.leaf`, when the model has it.
fn sibling<'a>(model: &'a Model, prefix: &str, leaf: &str) -> Option<&'a Tensor> {
    match model.node(&format!("{prefix}.{leaf}")) {
        Some(Node::Tensor(t)) => Some(model.tensor(t)),
        _ => None,
    }
}

fn contradiction(tensor: &Tensor, want: &[u64], field: &str, why: &str) -> Error {
    Error::QuantConfig {
        origin: "config.json".into(),
        reason: format!(
            "tensor {:?} has shape {:?} but field {field:?} implies {want:?} ({why})",
            tensor.name, tensor.shape
        ),
    }
}

fn expect(tensor: &Tensor, want: &[u64], field: &str, why: &str) -> Result<()> {
    if tensor.shape == want {
        Ok(())
    } else {
        Err(contradiction(tensor, want, field, why))
    }
}

/// Check every packed tensor of a pre-quantized `model` against `config`.
pub fn check_packed_tensors(model: &Model, config: &QuantConfig) -> Result<()> {
    for tensor in model.tensors() {
        let Some((prefix, leaf)) = tensor.name.rsplit_once('.') else {
            continue;
        };
        match (config, leaf) {
            (
                QuantConfig::Fp8 {
                    weight_block_size, ..
                },
                "weight_scale_inv",
            ) => check_fp8(model, tensor, prefix, *weight_block_size)?,
            (QuantConfig::Gptq(g), "qweight") => check_gptq(model, tensor, prefix, g)?,
            (QuantConfig::Awq(g), "qweight") => check_awq(model, tensor, prefix, g)?,
            (QuantConfig::Mxfp4 { .. }, l) if l.ends_with("_blocks") => {
                check_mxfp4(model, tensor, prefix, &l[..l.len() - "_blocks".len()])?
            }
            (QuantConfig::Bnb(b), "SCB") if b.bits == BnbBits::Eight => {
                if let Some(w) = sibling(model, prefix, "weight") {
                    let rows = w.shape.first().copied().unwrap_or(1);
                    expect(
                        tensor,
                        &[rows],
                        "load_in_8bit",
                        "one float32 scale per weight row",
                    )?;
                }
            }
            (QuantConfig::Bnb(b), "absmax" | "weight_absmax") if b.bits == BnbBits::Four => {
                check_bnb_absmax(tensor, b.double_quant)?
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_fp8(model: &Model, scale: &Tensor, prefix: &str, block: Option<[u64; 2]>) -> Result<()> {
    let Some(weight) = sibling(model, prefix, "weight") else {
        return Ok(());
    };
    let want: Vec<u64> = match (block, weight.shape.as_slice()) {
        (None, _) => {
            return if scale.numel == 1 {
                Ok(())
            } else {
                Err(contradiction(
                    scale,
                    &[],
                    "weight_block_size",
                    "null: one scale per tensor",
                ))
            }
        }
        (Some([b0, b1]), [lead @ .., rows, cols]) => {
            let mut w = lead.to_vec();
            w.extend([rows.div_ceil(b0), cols.div_ceil(b1)]);
            w
        }
        _ => return Ok(()),
    };
    expect(
        scale,
        &want,
        "weight_block_size",
        &format!("one scale per block of weight {:?}", weight.shape),
    )
}

/// `ceil(in / group_size)`, one group per row when `group_size` is -1.
fn groups(in_features: u64, group_size: i64) -> u64 {
    if group_size < 0 {
        1
    } else {
        in_features.div_ceil(group_size as u64)
    }
}

fn check_gptq(model: &Model, qweight: &Tensor, prefix: &str, g: &GroupConfig) -> Result<()> {
    let ([packed_in, out], true) = (qweight.shape.as_slice(), 32 % g.bits == 0) else {
        return Ok(()); // 3-bit packing spans words; only the scales are checked below
    };
    let per_word = u64::from(32 / g.bits);
    let in_features = packed_in * per_word;
    if qweight.dtype != DType::I32 {
        return Err(Error::QuantConfig {
            origin: "config.json".into(),
            reason: format!(
                "tensor {:?} is {} but gptq packs qweight in int32",
                qweight.name,
                qweight.dtype.safetensors_name()
            ),
        });
    }
    // g_idx first: it has one entry per input feature, so it tells bits apart from group_size.
    if let Some(i) = sibling(model, prefix, "g_idx") {
        let why = format!("{per_word} {}-bit values per int32 of qweight", g.bits);
        expect(i, &[in_features], "bits", &why)?;
    }
    let rows = groups(in_features, g.group_size);
    if let Some(s) = sibling(model, prefix, "scales") {
        let why = format!("one scale per group of the {in_features} input features");
        expect(s, &[rows, *out], "group_size", &why)?;
    }
    if let Some(z) = sibling(model, prefix, "qzeros") {
        expect(
            z,
            &[rows, out / per_word],
            "bits",
            "zeros packed like qweight, per group",
        )?;
    }
    Ok(())
}

fn check_awq(model: &Model, qweight: &Tensor, prefix: &str, g: &GroupConfig) -> Result<()> {
    let [in_features, packed_out] = qweight.shape.as_slice() else {
        return Ok(());
    };
    let per_word = u64::from(32 / g.bits);
    let rows = groups(*in_features, g.group_size);
    if let Some(s) = sibling(model, prefix, "scales") {
        let out = s.shape.get(1).copied().unwrap_or(0);
        let why = format!("{per_word} {}-bit values per int32 of qweight", g.bits);
        expect(qweight, &[*in_features, out / per_word], "bits", &why)?;
        let why = format!("one scale per group of {in_features} input features");
        expect(s, &[rows, packed_out * per_word], "group_size", &why)?;
    }
    if let Some(z) = sibling(model, prefix, "qzeros") {
        expect(
            z,
            &[rows, *packed_out],
            "group_size",
            "zeros packed like qweight, per group",
        )?;
    }
    Ok(())
}

fn check_mxfp4(model: &Model, blocks: &Tensor, prefix: &str, base: &str) -> Result<()> {
    let shape = &blocks.shape;
    if shape.last() != Some(&MXFP4_BLOCK_BYTES) {
        let mut want = shape.clone();
        if let Some(l) = want.last_mut() {
            *l = MXFP4_BLOCK_BYTES;
        }
        return Err(contradiction(
            blocks,
            &want,
            "quant_method",
            "mxfp4 packs 32 values in 16 bytes",
        ));
    }
    if let Some(scales) = sibling(model, prefix, &format!("{base}_scales")) {
        expect(
            scales,
            &shape[..shape.len() - 1],
            "quant_method",
            "mxfp4: one uint8 scale per block",
        )?;
    }
    Ok(())
}

fn check_bnb_absmax(absmax: &Tensor, double_quant: bool) -> Result<()> {
    let quantized = absmax.dtype == DType::U8;
    if quantized == double_quant {
        return Ok(());
    }
    Err(Error::QuantConfig {
        origin: "config.json".into(),
        reason: format!(
            "tensor {:?} is {} but field \"bnb_4bit_use_double_quant\" is {double_quant} (double quant stores absmax as uint8)",
            absmax.name,
            absmax.dtype.safetensors_name()
        ),
    })
}
