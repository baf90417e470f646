//! Lines of local text files (CSV, NDJSON) in parse errors.
//!
//! Arrow's CSV parser counts records from where a task started reading (from 0, the
//! header included), its NDJSON decoder names no line, and its schema inference reads
//! each NDJSON record alone (`at line 1`). An error is given the line an editor shows,
//! counted from the file's start, by reading the file again where it is local and
//! uncompressed (a remote or compressed CSV file, read whole, counts its records as
//! lines): only then, so reading costs nothing more.

use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;

/// How a scan's files count the lines its errors name.
#[derive(Debug, Clone)]
pub(crate) enum LineKind {
    /// Binary formats: errors name no line.
    None,
    /// CSV: Arrow's parser counts records from the split's start (from 0, the header
    /// included); they are found again from the file's start, walked with the scan's
    /// dialect where the file's plain bytes can be read (else counted as lines).
    Csv(Option<CsvDialect>),
    /// Newline-delimited JSON: Arrow's decoder names no line; the split's lines are
    /// decoded again with the columns the scan decodes until one fails with the same
    /// error.
    Json(SchemaRef),
}

/// How a CSV scan splits records (Arrow's parser is built on `csv-core` with these).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CsvDialect {
    pub delimiter: u8,
    pub quote: u8,
    pub escape: Option<u8>,
    /// The record terminator; `None`: `\r`, `\n` or `\r\n`.
    pub terminator: Option<u8>,
    pub comment: Option<u8>,
}

impl CsvDialect {
    /// The dialect of DataFusion's CSV `options`.
    pub(crate) fn of(options: &datafusion::common::config::CsvOptions) -> Self {
        Self {
            delimiter: options.delimiter,
            quote: options.quote,
            escape: options.escape,
            terminator: options.terminator,
            comment: options.comment,
        }
    }

    /// The first `records` records of the text `chunks` hold (all of them where they
    /// hold fewer, or those in the first `most` bytes), as one piece that ends where a
    /// record ends: never inside a quoted value, however its line breaks fall. `None`
    /// where no record ends in the first `most` bytes (a quote left open would
    /// otherwise take in the whole file).
    pub(crate) async fn first_records<S, E>(
        &self,
        mut chunks: S,
        records: usize,
        most: usize,
    ) -> Result<Option<Vec<u8>>, E>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    {
        use csv_core::ReadRecordResult;
        use futures::StreamExt;
        let mut reader = self.reader();
        // Fields and their ends are not looked at: written over at every call.
        let (mut out, mut ends) = (vec![0u8; 1 << 16], vec![0usize; 1 << 10]);
        let (mut head, mut seen, mut whole) = (Vec::new(), 0, 0);
        loop {
            let chunk = chunks.next().await.transpose()?;
            // At the end, an empty input ends the last record (so an empty input means
            // the end to `csv-core`: a chunk's is never handed to it).
            let mut input: &[u8] = chunk.as_deref().unwrap_or_default();
            loop {
                if input.is_empty() && chunk.is_some() {
                    break;
                }
                let (result, read, _, _) = reader.read_record(input, &mut out, &mut ends);
                head.extend_from_slice(&input[..read]);
                input = &input[read..];
                match result {
                    ReadRecordResult::Record => {
                        seen += 1;
                        whole = head.len();
                        if seen >= records || head.len() > most {
                            return Ok(Some(head));
                        }
                    }
                    ReadRecordResult::End => return Ok(Some(head)),
                    ReadRecordResult::InputEmpty if head.len() > most => {
                        if whole == 0 {
                            return Ok(None);
                        }
                        head.truncate(whole);
                        return Ok(Some(head));
                    }
                    ReadRecordResult::InputEmpty if chunk.is_some() => {}
                    ReadRecordResult::InputEmpty => return Ok(Some(head)),
                    ReadRecordResult::OutputFull | ReadRecordResult::OutputEndsFull => {}
                }
            }
        }
    }

    fn reader(&self) -> csv_core::Reader {
        let mut b = csv_core::ReaderBuilder::new();
        b.delimiter(self.delimiter)
            .quote(self.quote)
            .escape(self.escape)
            .comment(self.comment);
        if let Some(t) = self.terminator {
            b.terminator(csv_core::Terminator::Any(t));
        }
        b.build()
    }

    /// Whether the parser passes over `b` before a record (a blank line's end).
    fn ends_record(&self, b: u8) -> bool {
        match self.terminator {
            Some(t) => b == t,
            None => b == b'\n' || b == b'\r',
        }
    }
}

/// A text file read from byte `start` (to `end`, where a task reads part of it): local,
/// unless read whole (`start` 0). Its lines are counted from 1, as an editor shows
/// them.
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
        let mut prefix = file.take(self.start - 1);
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

    /// CSV: `message` with the line it names after its first `marker` (a record of
    /// the split, counted from `from`) as the line of the file where that record
    /// starts; `None` where it names no line or the file cannot be read.
    ///
    /// Without the dialect (a compressed file, read whole), records are taken for
    /// lines: blank lines, comments and quoted line breaks make the count short.
    pub fn renumber_csv(&self, message: &str, marker: &str, from: u64) -> Option<String> {
        // A value quoted in the message may hold the marker too: Arrow's own is
        // followed by the row's data where it gives it.
        let digits_at = |at: usize| message[at..].bytes().take_while(u8::is_ascii_digit).count();
        let found: Vec<usize> = message
            .match_indices(marker)
            .map(|(i, _)| i + marker.len())
            .filter(|&at| digits_at(at) > 0)
            .collect();
        let at = found
            .iter()
            .copied()
            .find(|&at| message[at + digits_at(at)..].starts_with(". Row data: "))
            .or_else(|| found.first().copied())?;
        let digits = digits_at(at);
        let line: u64 = message[at..at + digits].parse().ok()?;
        let record = line.checked_sub(from)?;
        let in_file = match &self.kind {
            LineKind::Csv(Some(dialect)) => self.csv_record_line(dialect, record)?,
            _ => self.first_line()?.checked_add(record)?,
        };
        Some(format!(
            "{}{in_file}{}",
            &message[..at],
            &message[at + digits..]
        ))
    }

    /// The line of the file where record `record` of the split (from 0) starts:
    /// the split's records walked as the parser reads them, passing over blank and
    /// comment lines and counting the line breaks of quoted values.
    fn csv_record_line(&self, dialect: &CsvDialect, record: u64) -> Option<u64> {
        let mut line = self.first_line()?;
        let mut file = std::fs::File::open(&self.path).ok()?;
        file.seek(SeekFrom::Start(self.start.saturating_sub(1)))
            .ok()?;
        let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
        if self.start > 0 {
            // The split starts after the first terminator at or after `start - 1` (as
            // the scan aligns it).
            let mut skipped = Vec::new();
            reader
                .read_until(dialect.terminator.unwrap_or(b'\n'), &mut skipped)
                .ok()?;
            // `first_line` counted the line break that ends the skipped bytes with `\n`.
            line = line - 1 + skipped.iter().filter(|b| **b == b'\n').count() as u64;
        }
        let newlines = |bytes: &[u8]| bytes.iter().filter(|b| **b == b'\n').count() as u64;
        let mut csv = dialect.reader();
        // Fields and their ends are not looked at: written over at every call.
        let (mut out, mut ends) = (vec![0u8; 1 << 16], vec![0usize; 1 << 10]);
        for _ in 0..record {
            loop {
                let input = reader.fill_buf().ok()?;
                let (result, read, _, _) = csv.read_record(input, &mut out, &mut ends);
                line += newlines(&input[..read]);
                reader.consume(read);
                match result {
                    csv_core::ReadRecordResult::Record => break,
                    csv_core::ReadRecordResult::End => return None,
                    _ => {}
                }
            }
        }
        // The record starts past the blank and comment lines before it.
        loop {
            let input = reader.fill_buf().ok()?;
            match input.first() {
                Some(&b) if dialect.ends_record(b) => {
                    line += u64::from(b == b'\n');
                    reader.consume(1);
                }
                Some(&b) if dialect.comment == Some(b) => {
                    // A comment runs to the end of its line, whatever the terminator.
                    let mut skipped = Vec::new();
                    reader.read_until(b'\n', &mut skipped).ok()?;
                    line += newlines(&skipped);
                }
                _ => return Some(line),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(start: u64, body: &str) -> (tempfile::NamedTempFile, LineOrigin) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), body).unwrap();
        let origin = LineOrigin {
            path: file.path().to_path_buf(),
            start,
            end: None,
            kind: LineKind::Csv(None),
        };
        (file, origin)
    }

    #[test]
    fn csv_lines_are_counted_from_the_files_start() {
        // The split starts at the third line ("2,2"), byte 8.
        let (_f, o) = origin(8, "a,b\n1,1\n2,2\n3,x\n");
        assert_eq!(o.first_line(), Some(3));
        // Arrow's parse error counts from 0: line 1 of the split is the file's 4th.
        let m = "Error while parsing value 'x' as type 'Int64' for column 1 at line 1. Row data: '[3,x]'";
        assert!(o
            .renumber_csv(m, " at line ", 0)
            .unwrap()
            .contains("at line 4. Row"));
        // A value holding the marker does not move it.
        let m = "Error while parsing value 'at line 9' as type 'Int64' for column 1 at line 1. Row data: '[3,at line 9]'";
        let r = o.renumber_csv(m, " at line ", 0).unwrap();
        assert!(
            r.contains("value 'at line 9'") && r.contains("at line 4. Row"),
            "{r}"
        );
        // A row with the wrong number of fields counts from 1.
        let m = "incorrect number of fields for line 2, expected 2 got 3";
        assert!(o
            .renumber_csv(m, " for line ", 1)
            .unwrap()
            .contains("for line 4,"));
        // A number too large for a line is left alone.
        let m = "incorrect number of fields for line 99999999999999999999999, expected 2";
        assert_eq!(o.renumber_csv(m, " for line ", 1), None);
    }

    /// CSV's usual dialect: `,` between values, `"` around them.
    fn comma_quote() -> CsvDialect {
        CsvDialect {
            delimiter: b',',
            quote: b'"',
            escape: None,
            terminator: None,
            comment: None,
        }
    }

    /// The first records come whole however the chunks cut the text: inside a quoted
    /// value, at a line break in it, at the end without a last line break.
    #[test]
    fn first_records_end_where_a_record_ends() {
        let dialect = comma_quote();
        let text = "a,b\n1,\"x\ny\"\n2,\"p, \nq\"\n3,z";
        let take = |cut: &[usize], n: usize| {
            let mut pieces = Vec::new();
            let mut at = 0;
            for &c in cut.iter().chain([&text.len()]) {
                pieces.push(Ok::<_, ()>(bytes::Bytes::from(text[at..c].to_string())));
                at = c;
            }
            let got = futures::executor::block_on(dialect.first_records(
                futures::stream::iter(pieces),
                n,
                usize::MAX,
            ));
            String::from_utf8(got.unwrap().unwrap()).unwrap()
        };
        for cut in [vec![], vec![7], vec![6, 8, 15], (1..text.len()).collect()] {
            assert_eq!(take(&cut, 1), "a,b\n", "{cut:?}");
            assert_eq!(take(&cut, 2), "a,b\n1,\"x\ny\"\n", "{cut:?}");
            assert_eq!(take(&cut, 3), "a,b\n1,\"x\ny\"\n2,\"p, \nq\"\n", "{cut:?}");
            assert_eq!(take(&cut, 9), text, "{cut:?}");
        }
    }

    /// A quote left open in the first record is found within the bytes allowed, not
    /// after the whole file is read.
    #[test]
    fn an_unclosed_quote_stops_at_the_limit() {
        use futures::StreamExt;
        let dialect = comma_quote();
        let pulled = std::sync::atomic::AtomicUsize::new(0);
        let chunks = std::iter::once("a,\"b\n".to_string())
            .chain(std::iter::repeat_n("1,2\n".repeat(256), 1000))
            .map(|c| Ok::<_, ()>(bytes::Bytes::from(c)));
        let stream = futures::stream::iter(chunks).inspect(|_| {
            pulled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        let got = futures::executor::block_on(dialect.first_records(stream, 10, 4096));
        assert_eq!(got, Ok(None));
        assert!(pulled.into_inner() <= 6);
        // A long file whose records end is cut where the last whole record ends.
        let chunks = std::iter::repeat_n("1,2\n".repeat(256), 1000)
            .map(|c| Ok::<_, ()>(bytes::Bytes::from(c)));
        let got = futures::executor::block_on(dialect.first_records(
            futures::stream::iter(chunks),
            usize::MAX,
            4096,
        ));
        let got = got.unwrap().unwrap();
        assert!(
            got.len() <= 4096 + 1024 && got.ends_with(b"1,2\n"),
            "{}",
            got.len()
        );
    }

    #[test]
    fn csv_records_are_found_past_blank_lines_comments_and_quoted_line_breaks() {
        let dialect = CsvDialect {
            delimiter: b',',
            quote: b'"',
            escape: None,
            terminator: None,
            comment: Some(b'#'),
        };
        // Records: 0 the header (line 1), 1 "1,1" (line 3), 2 the quoted value over
        // lines 5-6, 3 "3,x" (line 9, after a comment and a blank CRLF line).
        let body = "a,b\n\n1,1\n\n2,\"two\nlines\"\n# note\r\n\r\n3,x\n";
        let (_f, mut o) = origin(0, body);
        o.kind = LineKind::Csv(Some(dialect));
        let m = "Error while parsing value 'x' as type 'Int64' for column 1 at line 3. Row data: '[3,x]'";
        let r = o.renumber_csv(m, " at line ", 0).unwrap();
        assert!(r.contains("at line 9. Row"), "{r}");
        let m = "incorrect number of fields for line 3, expected 2 got 3";
        let r = o.renumber_csv(m, " for line ", 1).unwrap();
        assert!(r.contains("for line 5,"), "{r}");
        // A split from the second record's line: its record 2 is the file's "3,x".
        let (_f, mut o) = origin(5, body);
        o.kind = LineKind::Csv(Some(dialect));
        let m = "parse error at line 2. Row data: '[3,x]'";
        let r = o.renumber_csv(m, " at line ", 0).unwrap();
        assert!(r.contains("at line 9. Row"), "{r}");
        // Past the split's last record: no line.
        let m = "parse error at line 7. Row data: '[3,x]'";
        assert_eq!(o.renumber_csv(m, " at line ", 0), None);
    }

    #[test]
    fn a_json_line_is_found_by_its_own_error() {
        use arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut body = String::new();
        for i in 0..3000 {
            match i {
                // A value in a column the scan does not decode is passed over.
                1000 => body.push_str("{\"a\": 1, \"b\": \"x\"}\n"),
                2000 => body.push_str("oops\n"),
                2500 => body.push_str("{\"a\": \"x\"}\n"),
                _ => body.push_str(&format!("{{\"a\": {i}}}\n")),
            }
        }
        let (_f, mut o) = origin(0, &body);
        o.kind = LineKind::Json(Arc::clone(&schema));
        let m = "whilst decoding field 'a': failed to parse \"x\" as Int64";
        // The message the scan met (decoding the whole file as one stream).
        let mut decoder = arrow::json::ReaderBuilder::new(Arc::clone(&schema))
            .build_decoder()
            .unwrap();
        let mut bytes = body.as_bytes();
        let tape = loop {
            match decoder
                .decode(bytes)
                .and_then(|n| Ok((n, decoder.flush()?)))
            {
                Err(arrow::error::ArrowError::JsonError(m)) => break m,
                Ok((n, _)) if n > 0 => bytes = &bytes[n..],
                other => panic!("expected a JSON error, got {other:?}"),
            }
        };
        assert_eq!(o.find_json_line(&schema, &tape), Some(2001), "{tape}");
        assert_eq!(o.find_json_line(&schema, m), Some(2501));
        assert_eq!(o.find_json_line(&schema, "some other error"), None);
    }
}
