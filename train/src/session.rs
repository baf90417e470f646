//! The link between a run's driver and its ranks: dataset shards flow down, reports
//! flow up.
//!
//! The driver runs a [`SessionServer`] on a TCP port. A rank opens one connection per
//! pass over a dataset and reads its share of that pass's `streaming_split` as Arrow
//! IPC, and one connection on which it sends its reports (each acknowledged once the
//! driver has recorded it). Every connection starts with a greeting naming the run's
//! token, the attempt (restart count) and the rank, so that a rank of an earlier attempt
//! cannot take data meant for the current one.
//!
//! Frames: `[kind: u8][length: u32 LE][payload]`.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyError};
use volley_dataset::{Dataset, SplitIterator};

use crate::checkpoint::Checkpoint;

const HELLO: u8 = 1;
const BATCH: u8 = 2;
const END: u8 = 3;
const ERROR: u8 = 4;
const REPORT: u8 = 5;
const ACK: u8 = 6;
/// The run is to stop (a sweep's scheduler said so): the report was recorded.
const STOP: u8 = 7;

/// Largest frame accepted (a batch of the dataset).
const MAX_FRAME: usize = 1 << 31;

/// What one `ctx.report` carried to the driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// 1 for the run's first report; continues after a restart from the checkpoint's.
    pub iteration: u64,
    /// Rank 0's metrics.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// The checkpoint saved with it, if any.
    pub checkpoint: Option<Checkpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Shard { dataset: String, pass: u64 },
    Reports,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    token: String,
    attempt: u32,
    rank: usize,
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
        .ok_or_else(|| VolleyError::execution("a shard frame held no batch"))
}

struct ServerState {
    attempt: u32,
    /// Passes handed out in this attempt: one split iterator per rank, taken once.
    passes: HashMap<(String, u64), Vec<Option<SplitIterator>>>,
    history: Vec<Report>,
}

/// Sees every report as it arrives; `false` stops the run.
pub type ReportHook = Arc<dyn Fn(&Report) -> bool + Send + Sync>;

/// The driver's end.
pub(crate) struct SessionServer {
    hook: Option<ReportHook>,
    /// Set once the hook said stop.
    stopped: AtomicBool,
    address: SocketAddr,
    token: String,
    world: usize,
    equal: bool,
    datasets: HashMap<String, Dataset>,
    state: Mutex<ServerState>,
    stop: AtomicBool,
}

impl SessionServer {
    /// Listens on `host` (port chosen by the system) for the ranks of a group of `world`.
    pub(crate) fn start(
        host: &str,
        token: String,
        world: usize,
        equal: bool,
        datasets: HashMap<String, Dataset>,
        hook: Option<ReportHook>,
    ) -> Result<Arc<SessionServer>> {
        let listener = TcpListener::bind((host, 0)).map_err(|e| {
            VolleyError::execution(format!("trainer: cannot listen on {host}: {e}"))
        })?;
        let address = listener.local_addr()?;
        let server = Arc::new(SessionServer {
            hook,
            stopped: AtomicBool::new(false),
            address,
            token,
            world,
            equal,
            datasets,
            state: Mutex::new(ServerState {
                attempt: 0,
                passes: HashMap::new(),
                history: Vec::new(),
            }),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&server);
        std::thread::Builder::new()
            .name("volley-train-session".into())
            .spawn(move || s.accept_loop(listener))
            .map_err(|e| VolleyError::internal(format!("cannot start a thread: {e}")))?;
        Ok(server)
    }

    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// Starts attempt `attempt`: passes of earlier attempts are dropped (their readers
    /// get an error), the history keeps only reports up to `iteration` (what the
    /// attempt resumes from).
    pub(crate) fn begin_attempt(&self, attempt: u32, iteration: u64) {
        let mut s = self.state.lock().expect("session lock");
        s.attempt = attempt;
        s.passes.clear();
        s.history.retain(|r| r.iteration <= iteration);
    }

    /// Whether a report hook stopped the run.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub(crate) fn history(&self) -> Vec<Report> {
        self.state.lock().expect("session lock").history.clone()
    }

    /// Stops accepting connections.
    pub(crate) fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        for conn in listener.incoming() {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(conn) = conn else { continue };
            let s = Arc::clone(&self);
            let _ = std::thread::Builder::new()
                .name("volley-train-conn".into())
                .spawn(move || s.serve(conn));
        }
    }

    fn serve(&self, conn: TcpStream) {
        let _ = conn.set_nodelay(true);
        let Ok(read) = conn.try_clone() else { return };
        let mut r = BufReader::new(read);
        let mut w = BufWriter::new(conn);
        let hello = match read_frame(&mut r) {
            Ok((HELLO, bytes)) => serde_json::from_slice::<Hello>(&bytes).ok(),
            _ => None,
        };
        let Some(hello) = hello.filter(|h| h.token == self.token) else {
            // Not one of ours: say nothing useful and hang up.
            return;
        };
        let result = match hello.request {
            Request::Shard { dataset, pass } => {
                self.serve_shard(&mut w, hello.attempt, hello.rank, &dataset, pass)
            }
            Request::Reports => self.serve_reports(&mut r, &mut w, hello.attempt),
        };
        if let Err(e) = result {
            let _ = write_frame(&mut w, ERROR, e.to_string().as_bytes());
            let _ = w.flush();
        }
    }

    fn take_split(
        &self,
        attempt: u32,
        rank: usize,
        dataset: &str,
        pass: u64,
    ) -> Result<SplitIterator> {
        let mut s = self.state.lock().expect("session lock");
        if attempt != s.attempt {
            return Err(VolleyError::execution(format!(
                "rank {rank} belongs to attempt {attempt}, the run is at attempt {}",
                s.attempt
            )));
        }
        let ds = self.datasets.get(dataset).ok_or_else(|| {
            let mut names: Vec<&String> = self.datasets.keys().collect();
            names.sort();
            VolleyError::plan(format!(
                "no dataset named `{dataset}` was given to the trainer (it has {names:?})"
            ))
        })?;
        let key = (dataset.to_string(), pass);
        if !s.passes.contains_key(&key) {
            let splits = ds.streaming_split(self.world, self.equal)?;
            s.passes
                .insert(key.clone(), splits.into_iter().map(Some).collect());
        }
        let slots = s.passes.get_mut(&key).expect("inserted");
        let split = slots.get_mut(rank).and_then(Option::take).ok_or_else(|| {
            VolleyError::execution(format!(
                "rank {rank} asked twice for pass {pass} of dataset `{dataset}`"
            ))
        })?;
        if slots.iter().all(Option::is_none) {
            s.passes.remove(&key);
        }
        Ok(split)
    }

    fn serve_shard(
        &self,
        w: &mut impl Write,
        attempt: u32,
        rank: usize,
        dataset: &str,
        pass: u64,
    ) -> Result<()> {
        let split = self.take_split(attempt, rank, dataset, pass)?;
        for batch in split {
            let batch = batch?;
            if batch.num_rows() == 0 {
                continue;
            }
            let bytes = encode_batch(&batch)?;
            write_frame(w, BATCH, &bytes).map_err(send_err)?;
        }
        write_frame(w, END, &[]).map_err(send_err)?;
        w.flush().map_err(send_err)?;
        Ok(())
    }

    fn serve_reports(&self, r: &mut impl Read, w: &mut impl Write, attempt: u32) -> Result<()> {
        loop {
            let (kind, bytes) = match read_frame(r) {
                Ok(f) => f,
                // The rank finished or died: either way this connection is done.
                Err(_) => return Ok(()),
            };
            if kind != REPORT {
                return Err(VolleyError::execution(
                    "unexpected frame on the report link",
                ));
            }
            let report: Report = serde_json::from_slice(&bytes)
                .map_err(|e| VolleyError::execution(format!("a report is not valid: {e}")))?;
            let current = {
                let mut s = self.state.lock().expect("session lock");
                let current = s.attempt == attempt;
                if current {
                    s.history.push(report.clone());
                }
                current
            };
            let go_on = !current || self.hook.as_ref().is_none_or(|h| h(&report));
            if !go_on {
                self.stopped.store(true, Ordering::SeqCst);
            }
            write_frame(w, if go_on { ACK } else { STOP }, &[]).map_err(send_err)?;
            w.flush().map_err(send_err)?;
        }
    }
}

fn send_err(e: std::io::Error) -> VolleyError {
    VolleyError::execution(format!("sending to a rank: {e}"))
}

fn link_err(address: SocketAddr, e: std::io::Error) -> VolleyError {
    VolleyError::execution(format!("the trainer's driver at {address}: {e}"))
}

/// A rank's end.
#[derive(Debug)]
pub(crate) struct SessionClient {
    address: SocketAddr,
    token: String,
    attempt: u32,
    rank: usize,
    reports: Option<(BufReader<TcpStream>, BufWriter<TcpStream>)>,
}

impl SessionClient {
    pub(crate) fn new(address: SocketAddr, token: String, attempt: u32, rank: usize) -> Self {
        Self {
            address,
            token,
            attempt,
            rank,
            reports: None,
        }
    }

    fn connect(&self, request: Request) -> Result<TcpStream> {
        let mut conn = TcpStream::connect_timeout(&self.address, Duration::from_secs(30))
            .map_err(|e| link_err(self.address, e))?;
        let _ = conn.set_nodelay(true);
        let hello = serde_json::to_vec(&Hello {
            token: self.token.clone(),
            attempt: self.attempt,
            rank: self.rank,
            request,
        })
        .map_err(|e| VolleyError::internal(e.to_string()))?;
        write_frame(&mut conn, HELLO, &hello).map_err(|e| link_err(self.address, e))?;
        Ok(conn)
    }

    /// This rank's share of pass `pass` over `dataset`.
    pub(crate) fn open_shard(&self, dataset: &str, pass: u64) -> Result<ShardStream> {
        let conn = self.connect(Request::Shard {
            dataset: dataset.to_string(),
            pass,
        })?;
        Ok(ShardStream {
            address: self.address,
            reader: Some(BufReader::with_capacity(1 << 20, conn)),
        })
    }

    /// Sends `report` and waits until the driver has recorded it; `Cancelled` when the
    /// driver stops the run.
    pub(crate) fn report(&mut self, report: &Report) -> Result<()> {
        if self.reports.is_none() {
            let conn = self.connect(Request::Reports)?;
            let read = conn.try_clone().map_err(|e| link_err(self.address, e))?;
            self.reports = Some((BufReader::new(read), BufWriter::new(conn)));
        }
        let address = self.address;
        let (r, w) = self.reports.as_mut().expect("set above");
        let bytes = serde_json::to_vec(report).map_err(|e| VolleyError::internal(e.to_string()))?;
        write_frame(w, REPORT, &bytes)
            .and_then(|_| w.flush())
            .map_err(|e| link_err(address, e))?;
        match read_frame(r).map_err(|e| link_err(address, e))? {
            (ACK, _) => Ok(()),
            (STOP, _) => Err(VolleyError::Cancelled),
            (ERROR, m) => Err(VolleyError::execution(
                String::from_utf8_lossy(&m).into_owned(),
            )),
            (k, _) => Err(VolleyError::execution(format!(
                "unexpected frame {k} from the trainer's driver"
            ))),
        }
    }
}

/// Batches of one pass, as the driver streams them.
pub(crate) struct ShardStream {
    address: SocketAddr,
    reader: Option<BufReader<TcpStream>>,
}

impl Iterator for ShardStream {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let r = self.reader.as_mut()?;
        let out = match read_frame(r) {
            Ok((BATCH, bytes)) => return Some(decode_batch(&bytes)),
            Ok((END, _)) => None,
            Ok((ERROR, m)) => Some(Err(VolleyError::execution(
                String::from_utf8_lossy(&m).into_owned(),
            ))),
            Ok((k, _)) => Some(Err(VolleyError::execution(format!(
                "unexpected frame {k} from the trainer's driver"
            )))),
            Err(e) => Some(Err(link_err(self.address, e))),
        };
        self.reader = None;
        out
    }
}
