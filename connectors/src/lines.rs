//! Lines of local text files (CSV, NDJSON) in parse errors.
//!
//! Arrow's CSV parser counts lines from where a task started reading (from 0, the
//! header included), its NDJSON decoder names none, and its schema inference reads
//! each NDJSON record alone (`at line 1`). An error met in a local, uncompressed file
//! is given the line an editor shows, counted from the file's start: only then, so
//! reading costs nothing more.

use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;

/// How a scan's files count the lines its errors name.
#[derive(Debug, Clone)]
pub(crate) enum LineKind {
    /// Binary formats: errors name no line.
    None,
    /// CSV: Arrow's parser counts lines from the split's start (from 0, the header
    /// included); they are counted again from the file's start.
    Csv,
    /// Newline-delimited JSON: Arrow's decoder names no line; the split's lines are
    /// decoded again with the file's schema until one fails with the same error.
    Json(SchemaRef),
}

/// A local, uncompressed text file read from byte `start` (to `end`, where a task reads
/// part of it). Its lines are counted from 1, as an editor shows them (for CSV, where no
/// quoted value holds a line break: Arrow counts records).
#[derive(Debug)]
pub(crate) struct LineOrigin {
    pub path: PathBuf,
    pub start: u64,
    pub end: Option<u64>,
    pub kind: LineKind,
}

/// NDJSON lines decoded together while looking for a failing line: a chunk that
/// decodes is passed over at the decoder's speed; a failing one is decoded line by line.
const JSON_CHUNK_LINES: usize = 1024;

impl LineOrigin {
    /// The 1-based number of the split's first line: the first line that starts at or
    /// after `start`, so one more than the newlines before `start - 1`.
    fn first_line(&self) -> Option<u64> {
        if self.start == 0 {
            return Some(1);
        }
        let file = std::fs::File::open(&self.path).ok()?;
        let mut prefix = std::io::BufReader::new(file).take(self.start - 1);
        let mut newlines = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = prefix.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            newlines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        }
        Some(2 + newlines)
    }

    /// CSV: `message` with the line it names counted in the file; `None` where it
    /// names no line or the file cannot be read. Arrow's parse errors (`... at line N.
    /// Row data: ...`) count the split's lines from 0; its errors of rows with the
    /// wrong number of fields (`incorrect number of fields for line N, ...`) from 1.
    pub fn renumber_csv(&self, message: &str) -> Option<String> {
        let (marker, from) = if message.contains(" for line ") {
            (" for line ", 1)
        } else {
            (" at line ", 0)
        };
        let at = message.find(marker)? + marker.len();
        let digits = message[at..].bytes().take_while(u8::is_ascii_digit).count();
        let line: u64 = message[at..at + digits].parse().ok()?;
        Some(format!(
            "{}{}{}",
            &message[..at],
            self.first_line()? + line - from,
            &message[at + digits..]
        ))
    }

    /// NDJSON: the number of the split's first line whose decoding with `schema` fails
    /// with `message`; `None` where none does (a compressed or changed file).
    pub fn find_json_line(&self, schema: &SchemaRef, message: &str) -> Option<u64> {
        let mut line_no = self.first_line()?;
        let mut file = std::fs::File::open(&self.path).ok()?;
        // The split's first line starts at the first newline at or after `start - 1`.
        let mut at = self.start.saturating_sub(1);
        file.seek(SeekFrom::Start(at)).ok()?;
        let mut reader = std::io::BufReader::new(file);
        if self.start > 0 {
            let mut skipped = Vec::new();
            at += reader.read_until(b'\n', &mut skipped).ok()? as u64;
        }
        let fails = |bytes: &[u8]| -> Option<String> {
            let decoded = arrow::json::ReaderBuilder::new(Arc::clone(schema))
                .with_batch_size(JSON_CHUNK_LINES + 1)
                .build_decoder()
                .and_then(|mut d| {
                    d.decode(bytes)?;
                    d.flush()
                });
            match decoded {
                Ok(_) => None,
                Err(arrow::error::ArrowError::JsonError(m)) => Some(m),
                Err(e) => Some(e.to_string()),
            }
        };
        let mut chunk: Vec<u8> = Vec::new();
        let mut starts: Vec<usize> = Vec::new();
        loop {
            chunk.clear();
            starts.clear();
            while starts.len() < JSON_CHUNK_LINES && self.end.is_none_or(|end| at < end) {
                starts.push(chunk.len());
                let n = reader.read_until(b'\n', &mut chunk).ok()?;
                if n == 0 {
                    starts.pop();
                    break;
                }
                at += n as u64;
            }
            if starts.is_empty() {
                return None;
            }
            if fails(&chunk).is_some() {
                for (i, &from) in starts.iter().enumerate() {
                    let to = starts.get(i + 1).copied().unwrap_or(chunk.len());
                    if fails(&chunk[from..to]).as_deref() == Some(message) {
                        return Some(line_no + i as u64);
                    }
                }
            }
            line_no += starts.len() as u64;
        }
    }
}

/// `message`, an error of inferring the schema of the local NDJSON file at `path`
/// (`Not valid JSON: ... at line 1 column C`, each record parsed alone), with the line
/// of the record in the file; `None` where it cannot be found.
pub(crate) fn renumber_json_inference(path: &std::path::Path, message: &str) -> Option<String> {
    const PREFIX: &str = "Not valid JSON: ";
    let parse_error = message.strip_prefix(PREFIX)?;
    let reader = std::io::BufReader::new(std::fs::File::open(path).ok()?);
    let mut line = Vec::new();
    let mut reader = reader;
    for number in 1u64.. {
        line.clear();
        if reader.read_until(b'\n', &mut line).ok()? == 0 {
            return None;
        }
        let text = std::str::from_utf8(&line).ok()?.trim();
        if text.is_empty() {
            continue;
        }
        if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
            // The inference read this record first: the error must be its own.
            let own = e.to_string();
            if own != parse_error {
                return None;
            }
            let at = format!(" at line {} column {}", e.line(), e.column());
            return Some(format!(
                "{PREFIX}{} at line {number} column {}",
                own.strip_suffix(&at)?,
                e.column()
            ));
        }
    }
    None
}
