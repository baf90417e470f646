//! The channel between a run's driver and its processes: reports flow up (each one
//! answered with the driver's decision), and named streams of Arrow batches flow down
//! (a training rank's share of a dataset pass).
//!
//! ```text
//!   driver: ReportServer ◀── hello {token, peer, Reports} ──── ReportClient (rank / trial)
//!            │  handler.report(peer, report) ── Continue | Stop ──▶  report() -> Decision
//!            │  handler.stream(peer, name, pass) ── batches (IPC) ─▶ open_stream()
//!            │                                   ── object slices ─▶   └ read from the nodes
//!            │                                   ◀── acks ──────────
//! ```
//!
//! A part of a stream that stays in a cluster node's store travels as a reference (an
//! [`ObjectSlice`]): the peer reads the rows from the nodes and acknowledges, and the
//! driver holds the object's reference until then (at most [`ACK_WINDOW`] unacknowledged
//! at a time), so the bytes never pass through the driver. A peer that cannot read them
//! (the node that held them is gone, say) answers with a refusal instead, and the
//! driver sends the rows itself (waiting, if need be, while the cluster makes the object
//! again). Batch frames wait until every slice sent before them is settled, so a peer
//! waiting for a replacement holds at most the window's slices.
//!
//! Every connection starts with a greeting naming the run's token and the peer (trial,
//! attempt, rank), so that a process of an earlier attempt is told apart, and a
//! connection that does not know the token is closed without an answer. Frames are
//! `[kind: u8][length: u32 LE][payload]`; reports, greetings and slices are JSON.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyError};
use volley_dataset::{RemoteRows, SplitPart};
use volley_runtime::cluster::{object_batch, ObjectReader, ObjectSlice};

use crate::checkpoint::Checkpoint;

/// Metrics of one report: name to value.
pub type Metrics = BTreeMap<String, f64>;

/// Metrics from `(name, value)` pairs: `metrics([("loss", 0.3), ("accuracy", 0.9)])`.
pub fn metrics<const N: usize>(pairs: [(&str, f64); N]) -> Metrics {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Checks that every metric is a finite number: reports and checkpoint manifests are
/// JSON, which holds no NaN or infinity (a manifest written with one could not be read
/// back, and the run could not resume from any checkpoint after it).
pub fn check_metrics(metrics: &Metrics) -> Result<()> {
    match metrics.iter().find(|(_, v)| !v.is_finite()) {
        Some((name, value)) => Err(VolleyError::plan(format!(
            "report: metric `{name}` is {value} (did training diverge? check the learning \
             rate); metrics must be finite numbers"
        ))),
        None => Ok(()),
    }
}

/// What one report carries to the driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// 1 for the run's first report; continues after a restart from the checkpoint's.
    pub iteration: u64,
    /// The metrics.
    pub metrics: Metrics,
    /// The checkpoint saved with it, if any.
    pub checkpoint: Option<Checkpoint>,
}

/// Who is on the other end: which trial of a sweep (0 for a lone training run), which
/// attempt of it (restarts after failures), which rank of its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The trial's index in its sweep.
    pub trial: usize,
    /// The attempt (0 for the first run).
    pub attempt: u32,
    /// The rank in its group.
    pub rank: usize,
}

/// The driver's answer to a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Go on.
    Continue,
    /// Stop the run (a sweep's scheduler said so): the report was recorded.
    Stop,
}

/// What is streamed to a peer: batches, or rows it reads from the cluster's nodes.
pub type PartIter = Box<dyn Iterator<Item = Result<SplitPart>> + Send>;

/// What the driver does with what its processes send.
pub trait ReportHandler: Send + Sync + 'static {
    /// Records `report` from `peer` and decides whether its run goes on.
    fn report(&self, peer: &Peer, report: Report) -> Result<Decision>;

    /// The batches of pass `pass` over the stream `name` for `peer`. The default has no
    /// streams.
    fn stream(&self, _peer: &Peer, name: &str, _pass: u64) -> Result<PartIter> {
        Err(VolleyError::plan(format!(
            "this driver serves no stream (asked for `{name}`)"
        )))
    }
}

const HELLO: u8 = 1;
const BATCH: u8 = 2;
const END: u8 = 3;
const ERROR: u8 = 4;
const REPORT: u8 = 5;
const CONTINUE: u8 = 6;
const STOP: u8 = 7;
const OBJECT: u8 = 8;
const ACK: u8 = 9;
/// The peer could not read the oldest unsettled slice (payload: why).
const NACK: u8 = 10;
/// The rows of a refused slice, sent by the driver.
const REPLACEMENT: u8 = 11;

/// Object slices a stream may have sent ahead of the peer's acknowledgements: the
/// driver holds their references (and the nodes their bytes) until acknowledged.
const ACK_WINDOW: usize = 4;

/// Largest frame accepted (a batch of a dataset).
const MAX_FRAME: usize = 1 << 31;

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Reports,
    Stream { name: String, pass: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    token: String,
    peer: Peer,
    request: Request,
}

fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&[kind])?;
    w.write_all(&(payload.len() as u32).to_le_bytes())?;
    w.write_all(payload)
}

fn read_frame(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

fn encode_batch(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(out)
}

fn decode_batch(bytes: &[u8]) -> Result<RecordBatch> {
    let mut r = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    r.next()
        .transpose()?
        .ok_or_else(|| VolleyError::execution("a stream frame held no batch"))
}

/// The driver's end: accepts connections on a TCP port until shut down (or dropped).
pub struct ReportServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for ReportServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportServer")
            .field("address", &self.address)
            .finish()
    }
}

impl ReportServer {
    /// Listens on `host` (the port chosen by the system) for peers that know `token`;
    /// `name` names its threads.
    pub fn start(
        host: &str,
        token: String,
        handler: Arc<dyn ReportHandler>,
        name: &str,
    ) -> Result<ReportServer> {
        let listener = TcpListener::bind((host, 0))
            .map_err(|e| VolleyError::execution(format!("{name}: cannot listen on {host}: {e}")))?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = format!("{name}-reports");
        std::thread::Builder::new()
            .name(thread.clone())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let (token, handler) = (token.clone(), Arc::clone(&handler));
                    let _ = std::thread::Builder::new()
                        .name(thread.clone())
                        .spawn(move || serve(conn, &token, handler.as_ref()));
                }
            })
            .map_err(|e| VolleyError::internal(format!("cannot start a thread: {e}")))?;
        Ok(ReportServer { address, stop })
    }

    /// Where peers connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops accepting connections (those open finish what they do).
    pub fn shutdown(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
        }
    }
}

impl Drop for ReportServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(conn: TcpStream, token: &str, handler: &dyn ReportHandler) {
    let _ = conn.set_nodelay(true);
    let Ok(read) = conn.try_clone() else { return };
    let mut r = BufReader::new(read);
    let mut w = BufWriter::new(conn);
    let hello = match read_frame(&mut r) {
        Ok((HELLO, bytes)) => serde_json::from_slice::<Hello>(&bytes).ok(),
        _ => None,
    };
    let Some(hello) = hello.filter(|h| h.token == token) else {
        // Not one of ours: say nothing useful and hang up.
        return;
    };
    let result = match hello.request {
        Request::Reports => serve_reports(&mut r, &mut w, &hello.peer, handler),
        Request::Stream { name, pass } => {
            // Remote parts sent and not yet settled: their references keep the objects
            // alive until the peer has read them, including past an error below (the
            // peer may still be reading slices sent before it).
            let mut unacked = VecDeque::new();
            let result = serve_stream(
                &mut r,
                &mut w,
                &hello.peer,
                handler,
                (&name, pass),
                &mut unacked,
            );
            if let Err(e) = result {
                let _ = write_frame(&mut w, ERROR, e.to_string().as_bytes());
                let _ = w.flush();
                // Let the peer finish the slices it holds (or hang up) before they go.
                let _ = r.get_ref().set_read_timeout(Some(Duration::from_secs(30)));
                while !unacked.is_empty() && settle(&mut r, &mut w, &mut unacked).is_ok() {}
            }
            return;
        }
    };
    if let Err(e) = result {
        let _ = write_frame(&mut w, ERROR, e.to_string().as_bytes());
        let _ = w.flush();
    }
}

/// Streams pass `pass` of `name` to `peer`: batches as IPC frames, remote rows as
/// slices settled in a window.
fn serve_stream(
    r: &mut impl Read,
    w: &mut impl Write,
    peer: &Peer,
    handler: &dyn ReportHandler,
    (name, pass): (&str, u64),
    unacked: &mut VecDeque<RemoteRows>,
) -> Result<()> {
    for part in handler.stream(peer, name, pass)? {
        match part? {
            SplitPart::Batch(b) if b.num_rows() == 0 => continue,
            SplitPart::Batch(b) => {
                while !unacked.is_empty() {
                    settle(r, w, unacked)?;
                }
                write_frame(w, BATCH, &encode_batch(&b)?).map_err(send_err)?
            }
            SplitPart::Remote(rows) => {
                while unacked.len() >= ACK_WINDOW {
                    settle(r, w, unacked)?;
                }
                let slice = serde_json::to_vec(rows.slice())
                    .map_err(|e| VolleyError::internal(e.to_string()))?;
                write_frame(w, OBJECT, &slice).map_err(send_err)?;
                w.flush().map_err(send_err)?;
                unacked.push_back(rows);
            }
        }
    }
    while !unacked.is_empty() {
        settle(r, w, unacked)?;
    }
    write_frame(w, END, &[]).map_err(send_err)?;
    w.flush().map_err(send_err)
}

/// Waits for the peer's answer on the oldest unsettled slice: an acknowledgement lets
/// its object go; a refusal gets its rows sent from here.
fn settle(r: &mut impl Read, w: &mut impl Write, unacked: &mut VecDeque<RemoteRows>) -> Result<()> {
    let rows = unacked
        .pop_front()
        .ok_or_else(|| VolleyError::internal("no slice waits for an answer"))?;
    match read_frame(r) {
        Ok((ACK, _)) => Ok(()),
        Ok((NACK, why)) => {
            tracing::warn!(
                "a process could not read rows of object {} from the nodes ({}); the \
                 driver sends them",
                rows.slice().id,
                String::from_utf8_lossy(&why)
            );
            let batch = rows.fetch()?;
            write_frame(w, REPLACEMENT, &encode_batch(&batch)?).map_err(send_err)?;
            w.flush().map_err(send_err)
        }
        Ok((k, _)) => Err(VolleyError::execution(format!(
            "unexpected frame {k} on a stream (an answer on a slice was due)"
        ))),
        Err(e) => Err(send_err(e)),
    }
}

fn serve_reports(
    r: &mut impl Read,
    w: &mut impl Write,
    peer: &Peer,
    handler: &dyn ReportHandler,
) -> Result<()> {
    loop {
        let (kind, bytes) = match read_frame(r) {
            Ok(f) => f,
            // The peer finished or died: either way this connection is done.
            Err(_) => return Ok(()),
        };
        if kind != REPORT {
            return Err(VolleyError::execution(
                "unexpected frame on the report link",
            ));
        }
        let report: Report = serde_json::from_slice(&bytes)
            .map_err(|e| VolleyError::execution(format!("a report is not valid: {e}")))?;
        let answer = match handler.report(peer, report)? {
            Decision::Continue => CONTINUE,
            Decision::Stop => STOP,
        };
        write_frame(w, answer, &[]).map_err(send_err)?;
        w.flush().map_err(send_err)?;
    }
}

fn send_err(e: std::io::Error) -> VolleyError {
    VolleyError::execution(format!("sending to a run's process: {e}"))
}

fn link_err(address: SocketAddr, e: impl std::fmt::Display) -> VolleyError {
    VolleyError::execution(format!("the run's driver at {address}: {e}"))
}

/// A process's end: sends reports (one connection, kept) and opens streams.
#[derive(Debug)]
pub struct ReportClient {
    address: SocketAddr,
    token: String,
    peer: Peer,
    reports: Option<(BufReader<TcpStream>, BufWriter<TcpStream>)>,
}

impl ReportClient {
    /// A client of the driver at `address`, as `peer`.
    pub fn new(address: SocketAddr, token: String, peer: Peer) -> Self {
        Self {
            address,
            token,
            peer,
            reports: None,
        }
    }

    fn connect(&self, request: Request) -> Result<TcpStream> {
        let mut conn = TcpStream::connect_timeout(&self.address, Duration::from_secs(30))
            .map_err(|e| link_err(self.address, e))?;
        let _ = conn.set_nodelay(true);
        let hello = serde_json::to_vec(&Hello {
            token: self.token.clone(),
            peer: self.peer,
            request,
        })
        .map_err(|e| VolleyError::internal(e.to_string()))?;
        write_frame(&mut conn, HELLO, &hello).map_err(|e| link_err(self.address, e))?;
        Ok(conn)
    }

    /// Sends `report` and waits until the driver has recorded it and decided.
    pub fn report(&mut self, report: &Report) -> Result<Decision> {
        if self.reports.is_none() {
            let conn = self.connect(Request::Reports)?;
            let read = conn.try_clone().map_err(|e| link_err(self.address, e))?;
            self.reports = Some((BufReader::new(read), BufWriter::new(conn)));
        }
        let address = self.address;
        let (r, w) = self.reports.as_mut().expect("set above");
        let bytes = serde_json::to_vec(report).map_err(|e| VolleyError::internal(e.to_string()))?;
        let answer = write_frame(w, REPORT, &bytes)
            .and_then(|_| w.flush())
            .and_then(|_| read_frame(r));
        match answer {
            Ok((CONTINUE, _)) => Ok(Decision::Continue),
            Ok((STOP, _)) => Ok(Decision::Stop),
            Ok((ERROR, m)) => {
                self.reports = None;
                Err(VolleyError::execution(
                    String::from_utf8_lossy(&m).into_owned(),
                ))
            }
            Ok((k, _)) => {
                self.reports = None;
                Err(link_err(address, format!("unexpected frame {k}")))
            }
            Err(e) => {
                self.reports = None;
                Err(link_err(address, e))
            }
        }
    }

    /// The batches of pass `pass` over the driver's stream `name`. Rows the driver
    /// sends as references are read from the cluster's nodes (with the token of this
    /// worker process).
    pub fn open_stream(&self, name: &str, pass: u64) -> Result<BatchStream> {
        let conn = self.connect(Request::Stream {
            name: name.to_string(),
            pass,
        })?;
        let acks = conn.try_clone().map_err(|e| link_err(self.address, e))?;
        Ok(BatchStream {
            address: self.address,
            reader: Some(BufReader::with_capacity(1 << 20, conn)),
            acks,
            ahead: VecDeque::new(),
            objects: None,
        })
    }
}

/// Batches of one pass of a stream, as the driver sends them.
pub struct BatchStream {
    address: SocketAddr,
    reader: Option<BufReader<TcpStream>>,
    /// The same connection, for answers on slices.
    acks: TcpStream,
    /// Frames read past a refused slice while waiting for its rows.
    ahead: VecDeque<(u8, Vec<u8>)>,
    /// Made on the first slice the driver sends by reference.
    objects: Option<ObjectReader>,
}

impl std::fmt::Debug for BatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchStream")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl BatchStream {
    /// The rows of a slice the driver sent by reference: read from the nodes and
    /// acknowledged, or, when they cannot be read from here, refused and received from
    /// the driver.
    fn slice_rows(&mut self, bytes: &[u8]) -> Result<RecordBatch> {
        let slice: ObjectSlice = serde_json::from_slice(bytes)
            .map_err(|e| link_err(self.address, format!("an object slice is not valid: {e}")))?;
        match self.read_from_nodes(&slice) {
            Ok(b) => {
                write_frame(&mut self.acks, ACK, &[]).map_err(|e| link_err(self.address, e))?;
                Ok(b)
            }
            Err(why) => {
                write_frame(&mut self.acks, NACK, why.to_string().as_bytes())
                    .map_err(|e| link_err(self.address, e))?;
                self.replacement()
            }
        }
    }

    fn read_from_nodes(&mut self, slice: &ObjectSlice) -> Result<RecordBatch> {
        if self.objects.is_none() {
            self.objects = Some(ObjectReader::from_env()?);
        }
        let batches = self.objects.as_ref().expect("made above").read(slice)?;
        object_batch(&slice.id, batches)
    }

    /// Waits for the rows of a refused slice; frames the driver sent before answering
    /// the refusal are kept for later.
    fn replacement(&mut self) -> Result<RecordBatch> {
        let address = self.address;
        let r = self
            .reader
            .as_mut()
            .ok_or_else(|| link_err(address, "the stream is closed"))?;
        loop {
            match read_frame(r).map_err(|e| link_err(address, e))? {
                (REPLACEMENT, bytes) => return decode_batch(&bytes),
                (ERROR, m) => {
                    return Err(VolleyError::execution(
                        String::from_utf8_lossy(&m).into_owned(),
                    ))
                }
                frame => self.ahead.push_back(frame),
            }
        }
    }

    /// Ends the stream with `out`: the connection is closed both ways, so the driver
    /// stops waiting for answers.
    fn end(&mut self, out: Option<Result<RecordBatch>>) -> Option<Result<RecordBatch>> {
        self.reader = None;
        self.ahead.clear();
        let _ = self.acks.shutdown(std::net::Shutdown::Both);
        out
    }
}

impl Iterator for BatchStream {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let frame = match self.ahead.pop_front() {
            Some(f) => Ok(f),
            None => read_frame(self.reader.as_mut()?),
        };
        match frame {
            Ok((BATCH, bytes)) => Some(decode_batch(&bytes)),
            Ok((OBJECT, bytes)) => match self.slice_rows(&bytes) {
                Ok(b) => Some(Ok(b)),
                Err(e) => self.end(Some(Err(e))),
            },
            Ok((END, _)) => self.end(None),
            Ok((ERROR, m)) => self.end(Some(Err(VolleyError::execution(
                String::from_utf8_lossy(&m).into_owned(),
            )))),
            Ok((k, _)) => {
                let e = link_err(self.address, format!("unexpected frame {k}"));
                self.end(Some(Err(e)))
            }
            Err(e) => {
                let e = link_err(self.address, e);
                self.end(Some(Err(e)))
            }
        }
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        let _ = self.acks.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn metrics_must_be_finite() {
        check_metrics(&metrics([("loss", 0.5), ("accuracy", 1.0)])).unwrap();
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let e = check_metrics(&metrics([("accuracy", 1.0), ("loss", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("metric `loss` is") && e.contains("finite"),
                "{e}"
            );
        }
    }

    /// Stops every run at its third report; streams 3 batches of `pass + 1` rows.
    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<(Peer, u64)>>,
    }

    impl ReportHandler for Recorder {
        fn report(&self, peer: &Peer, report: Report) -> Result<Decision> {
            self.seen.lock().unwrap().push((*peer, report.iteration));
            Ok(if report.iteration >= 3 {
                Decision::Stop
            } else {
                Decision::Continue
            })
        }

        fn stream(&self, _: &Peer, name: &str, pass: u64) -> Result<PartIter> {
            if name != "train" {
                return Err(VolleyError::plan(format!("no stream `{name}`")));
            }
            let rows = (pass + 1) as i64;
            Ok(Box::new((0..3).map(move |i| {
                Ok(SplitPart::Batch(RecordBatch::try_from_iter([(
                    "x",
                    Arc::new(arrow::array::Int64Array::from_iter_values(
                        i * rows..(i + 1) * rows,
                    )) as arrow::array::ArrayRef,
                )])?))
            })))
        }
    }

    /// Streams `parts` once.
    struct Parts(Mutex<Option<Vec<SplitPart>>>);

    impl ReportHandler for Parts {
        fn report(&self, _: &Peer, _: Report) -> Result<Decision> {
            Ok(Decision::Continue)
        }

        fn stream(&self, _: &Peer, _: &str, _: u64) -> Result<PartIter> {
            let parts = self.0.lock().unwrap().take().unwrap_or_default();
            Ok(Box::new(parts.into_iter().map(Ok)))
        }
    }

    fn ints(range: std::ops::Range<i64>) -> RecordBatch {
        RecordBatch::try_from_iter([(
            "x",
            Arc::new(arrow::array::Int64Array::from_iter_values(range)) as arrow::array::ArrayRef,
        )])
        .unwrap()
    }

    /// A process that cannot read rows from the nodes (here: it holds no cluster token)
    /// refuses the slice, and the driver sends the rows itself, in their place.
    #[test]
    fn refused_slices_are_sent_by_the_driver_in_order() {
        use volley_runtime::cluster::{LocalCluster, ObjectState, Resources};
        let local = LocalCluster::start(Resources::cpus(1.0), vec![]).unwrap();
        let cluster = local.cluster().clone();
        let object = cluster.put(vec![ints(0..700), ints(700..1000)]).unwrap();
        let meta = match cluster
            .wait_objects(std::slice::from_ref(&object), 1, Duration::from_secs(30))
            .unwrap()
            .remove(0)
        {
            ObjectState::Ready(meta) => meta,
            other => panic!("{other:?}"),
        };
        let rows = volley_dataset::RemoteRows::new(object, meta, cluster);
        let parts = vec![
            SplitPart::Batch(ints(-5..0)),
            SplitPart::Remote(rows),
            SplitPart::Batch(ints(1000..1003)),
        ];
        let handler = Arc::new(Parts(Mutex::new(Some(parts))));
        let server = ReportServer::start(
            "127.0.0.1",
            "secret".into(),
            handler as Arc<dyn ReportHandler>,
            "test",
        )
        .unwrap();
        let peer = Peer {
            trial: 0,
            attempt: 0,
            rank: 0,
        };
        let client = ReportClient::new(server.address(), "secret".into(), peer);
        let got: Vec<i64> = client
            .open_stream("train", 0)
            .unwrap()
            .flat_map(|b| {
                let b = b.unwrap();
                let x = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .unwrap();
                x.values().to_vec()
            })
            .collect();
        assert_eq!(got, (-5..1003).collect::<Vec<_>>());
    }

    fn report(iteration: u64) -> Report {
        Report {
            iteration,
            metrics: metrics([("loss", 1.0 / iteration as f64)]),
            checkpoint: None,
        }
    }

    #[test]
    fn reports_are_answered_and_streams_flow() {
        let handler = Arc::new(Recorder::default());
        let server = ReportServer::start(
            "127.0.0.1",
            "secret".into(),
            Arc::clone(&handler) as Arc<dyn ReportHandler>,
            "test",
        )
        .unwrap();
        let peer = Peer {
            trial: 4,
            attempt: 1,
            rank: 0,
        };
        let mut client = ReportClient::new(server.address(), "secret".into(), peer);
        assert_eq!(client.report(&report(1)).unwrap(), Decision::Continue);
        assert_eq!(client.report(&report(2)).unwrap(), Decision::Continue);
        assert_eq!(client.report(&report(3)).unwrap(), Decision::Stop);
        assert_eq!(
            *handler.seen.lock().unwrap(),
            vec![(peer, 1), (peer, 2), (peer, 3)]
        );
        let rows: usize = client
            .open_stream("train", 1)
            .unwrap()
            .map(|b| b.unwrap().num_rows())
            .sum();
        assert_eq!(rows, 6);
        let err = client
            .open_stream("test", 0)
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("no stream `test`"), "{err}");
    }

    #[test]
    fn a_peer_without_the_token_gets_no_answer() {
        let server = ReportServer::start(
            "127.0.0.1",
            "secret".into(),
            Arc::new(Recorder::default()),
            "test",
        )
        .unwrap();
        let peer = Peer {
            trial: 0,
            attempt: 0,
            rank: 0,
        };
        let mut client = ReportClient::new(server.address(), "wrong".into(), peer);
        assert!(client.report(&report(1)).is_err());
        server.shutdown();
    }
}
