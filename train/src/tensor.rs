//! Arrow columns to Burn tensors, column by column (no row-by-row copy).

use arrow::array::{Array, ArrayRef, FixedSizeListArray, Float32Array, Int64Array, RecordBatch};
use arrow::datatypes::DataType;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use volley_common::{Result, VolleyError};

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| {
        VolleyError::plan(format!(
            "column `{name}` is not in the batch (it has {:?})",
            batch
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect::<Vec<_>>()
        ))
    })
}

fn no_nulls(name: &str, a: &dyn Array) -> Result<()> {
    if a.null_count() > 0 {
        return Err(VolleyError::execution(format!(
            "column `{name}` has {} nulls: a tensor cannot hold them (fill or filter them first)",
            a.null_count()
        )));
    }
    Ok(())
}

fn as_f32(name: &str, a: &ArrayRef) -> Result<Float32Array> {
    no_nulls(name, a.as_ref())?;
    if !a.data_type().is_numeric() {
        return Err(VolleyError::plan(format!(
            "column `{name}` is {}, not numeric",
            a.data_type()
        )));
    }
    let c = arrow::compute::cast(a, &DataType::Float32)?;
    Ok(c.as_any()
        .downcast_ref::<Float32Array>()
        .expect("cast to Float32")
        .clone())
}

/// A `[rows, columns.len()]` float tensor of numeric `columns` (cast to f32), laid out
/// row-major: each column's values are written into their stride of one buffer.
pub fn features_tensor<B: Backend>(
    batch: &RecordBatch,
    columns: &[&str],
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let rows = batch.num_rows();
    let width = columns.len();
    if width == 0 {
        return Err(VolleyError::plan(
            "features_tensor needs at least one column",
        ));
    }
    let mut out = vec![0f32; rows * width];
    for (j, name) in columns.iter().enumerate() {
        let values = as_f32(name, column(batch, name)?)?;
        for (slot, v) in out.iter_mut().skip(j).step_by(width).zip(values.values()) {
            *slot = *v;
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(out, [rows, width]),
        device,
    ))
}

/// A `[rows, width]` float tensor from one fixed-size-list column of numbers (an
/// embedding, an image row): its values buffer is already row-major.
pub fn list_tensor<B: Backend>(
    batch: &RecordBatch,
    name: &str,
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let a = column(batch, name)?;
    no_nulls(name, a.as_ref())?;
    let list = a
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .ok_or_else(|| {
            VolleyError::plan(format!(
                "column `{name}` is {}, not a fixed-size list",
                a.data_type()
            ))
        })?;
    let width = list.value_length() as usize;
    let values = as_f32(
        name,
        &list
            .values()
            .slice(list.offset() * width, list.len() * width),
    )?;
    Ok(Tensor::from_data(
        TensorData::new(values.values().to_vec(), [list.len(), width]),
        device,
    ))
}

/// A `[rows]` integer tensor (class labels, token ids) from an integer column.
pub fn int_tensor<B: Backend>(
    batch: &RecordBatch,
    name: &str,
    device: &B::Device,
) -> Result<Tensor<B, 1, Int>> {
    let a = column(batch, name)?;
    no_nulls(name, a.as_ref())?;
    if !a.data_type().is_integer() {
        return Err(VolleyError::plan(format!(
            "column `{name}` is {}, not an integer column",
            a.data_type()
        )));
    }
    // Unsafe casting: a UInt64 value past i64's range is an error, not a null read as 0.
    let c = arrow::compute::cast_with_options(
        a,
        &DataType::Int64,
        &arrow::compute::CastOptions {
            safe: false,
            ..Default::default()
        },
    )
    .map_err(|e| VolleyError::plan(format!("column `{name}`: {e}")))?;
    let values = c
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("cast to Int64");
    Ok(Tensor::from_data(
        TensorData::new(values.values().to_vec(), [values.len()]),
        device,
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int32Array, StringArray};
    use arrow::datatypes::{Field, Float32Type};
    use burn::backend::NdArray;

    use super::*;

    type B = NdArray<f32>;

    fn batch() -> RecordBatch {
        let list = FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
            vec![
                Some(vec![Some(1.0), Some(2.0)]),
                Some(vec![Some(3.0), Some(4.0)]),
                Some(vec![Some(5.0), Some(6.0)]),
            ],
            2,
        );
        RecordBatch::try_from_iter([
            (
                "a",
                Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0])) as ArrayRef,
            ),
            (
                "b",
                Arc::new(Int32Array::from(vec![10, 20, 30])) as ArrayRef,
            ),
            (
                "s",
                Arc::new(StringArray::from(vec!["x", "y", "z"])) as ArrayRef,
            ),
            ("l", Arc::new(list) as ArrayRef),
        ])
        .unwrap()
    }

    #[test]
    fn columns_interleave_row_major() {
        let d = Default::default();
        let t = features_tensor::<B>(&batch(), &["a", "b"], &d).unwrap();
        assert_eq!(t.dims(), [3, 2]);
        let v: Vec<f32> = t.into_data().to_vec().unwrap();
        assert_eq!(v, vec![1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
        let l = list_tensor::<B>(&batch().slice(1, 2), "l", &d).unwrap();
        let v: Vec<f32> = l.into_data().to_vec().unwrap();
        assert_eq!(v, vec![3.0, 4.0, 5.0, 6.0]);
        let y = int_tensor::<B>(&batch(), "b", &d).unwrap();
        assert_eq!(y.dims(), [3]);
    }

    #[test]
    fn bad_columns_are_named() {
        let d = Default::default();
        let e = features_tensor::<B>(&batch(), &["a", "nope"], &d).unwrap_err();
        assert!(e.to_string().contains("`nope`"), "{e}");
        let e = features_tensor::<B>(&batch(), &["s"], &d).unwrap_err();
        assert!(e.to_string().contains("not numeric"), "{e}");
        let e = int_tensor::<B>(&batch(), "a", &d).unwrap_err();
        assert!(e.to_string().contains("not an integer"), "{e}");
        let with_null = RecordBatch::try_new(
            Arc::new(arrow::datatypes::Schema::new(vec![Field::new(
                "a",
                DataType::Float64,
                true,
            )])),
            vec![Arc::new(Float64Array::from(vec![Some(1.0), None]))],
        )
        .unwrap();
        let e = features_tensor::<B>(&with_null, &["a"], &d).unwrap_err();
        assert!(e.to_string().contains("1 nulls"), "{e}");
    }
}
