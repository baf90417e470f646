//! Byte sizes as people write them: `512MiB`, `2GiB`, `1.5GB`, `4096`.

use crate::{Result, VolleyError};

/// Parses a byte size: a number with an optional unit (`B`, `KB`, `KiB`, `MB`, `MiB`,
/// `GB`, `GiB`, `TB`, `TiB`; case-insensitive, space allowed).
///
/// ```
/// assert_eq!(volley_common::parse_bytes("512MiB").unwrap(), 512 << 20);
/// assert_eq!(volley_common::parse_bytes("1.5 GB").unwrap(), 1_500_000_000);
/// assert!(volley_common::parse_bytes("lots").is_err());
/// ```
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        VolleyError::Config(format!("`{s}` is not a byte size (try 512MiB or 2GiB)"))
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => (1u64 << 20) as f64,
        "g" | "gb" => 1e9,
        "gib" => (1u64 << 30) as f64,
        "t" | "tb" => 1e12,
        "tib" => (1u64 << 40) as f64,
        other => {
            return Err(VolleyError::Config(format!(
                "unknown size unit `{other}` in `{s}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            )))
        }
    };
    Ok((value * mult).round() as u64)
}

/// Formats a byte count for people: `1.5 GiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Bytes of memory `batch` holds, each buffer counted once.
///
/// `RecordBatch::get_array_memory_size` counts a buffer once per array that points into
/// it; the arrays of a batch read from an Arrow IPC file or a Flight message all slice
/// one message body, which it would count once per column (and budgets would see tens
/// of times the bytes there are).
pub fn batch_memory(batch: &arrow::record_batch::RecordBatch) -> u64 {
    datafusion::common::utils::memory::get_record_batch_memory_size(batch) as u64
}

/// Bytes of memory `batches` hold together, a buffer they share counted once (the
/// slices of one batch, a message body).
pub fn batches_memory(batches: &[arrow::record_batch::RecordBatch]) -> u64 {
    let mut counter = datafusion::common::utils::memory::RecordBatchMemoryCounter::new();
    batches.iter().map(|b| counter.count_batch(b) as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("10 kb").unwrap(), 10_000);
        assert_eq!(parse_bytes("7").unwrap(), 7);
        assert!(parse_bytes("1XB").is_err());
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(12), "12 B");
    }

    #[test]
    fn a_batch_read_from_ipc_counts_its_body_once() {
        use arrow::array::{ArrayRef, Int64Array};
        use arrow::record_batch::RecordBatch;
        use std::sync::Arc;
        let col = || Arc::new(Int64Array::from_iter_values(0..100_000)) as ArrayRef;
        let batch =
            RecordBatch::try_from_iter([("a", col()), ("b", col()), ("c", col()), ("d", col())])
                .unwrap();
        let mut bytes = Vec::new();
        let mut w = arrow::ipc::writer::FileWriter::try_new(&mut bytes, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        drop(w);
        let read = arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        // One body of 4 x 800 KB: counted once, not once per column.
        let once = batch_memory(&read);
        assert!((3_200_000..3_400_000).contains(&once), "{once}");
        assert!(read.get_array_memory_size() as u64 >= 4 * once);
        // Slices of one batch hold it once together.
        let halves = [read.slice(0, 50_000), read.slice(50_000, 50_000)];
        assert_eq!(batches_memory(&halves), once);
    }
}
