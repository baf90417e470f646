//! The Arrow Flight service of a node's store, and the tickets that name what a
//! `DoGet` reads.

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};
use volley_common::{Result, VolleyError};

use super::ipc_file::file_batch_messages;
use super::shared::{ACTION_ADOPT, ACTION_LOCATE};
use super::transfer::{flight_encoder, for_flight};
use super::{slice_rows, ObjectStore, Selection};

/// The Arrow Flight face of an [`ObjectStore`].
#[derive(Debug, Clone)]
pub struct FlightObjects {
    store: Arc<ObjectStore>,
}

impl FlightObjects {
    /// Serves `store`.
    pub fn new(store: Arc<ObjectStore>) -> Self {
        Self { store }
    }

    /// Runs `f` on the store off the async threads: reading, writing and spilling
    /// objects of hundreds of MB is blocking file work, and the agent's heartbeats and
    /// task reports share those threads (a node busy moving objects must not look dead).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ObjectStore) -> T + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("the object store's thread failed: {e}")))
    }
}

type BoxedStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

fn unsupported<T>(what: &str) -> std::result::Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what}: a volley object store only serves DoGet and DoPut"
    )))
}

#[tonic::async_trait]
impl FlightService for FlightObjects {
    type HandshakeStream = BoxedStream<HandshakeResponse>;
    type ListFlightsStream = BoxedStream<FlightInfo>;
    type DoGetStream = BoxedStream<FlightData>;
    type DoPutStream = BoxedStream<PutResult>;
    type DoExchangeStream = BoxedStream<FlightData>;
    type DoActionStream = BoxedStream<arrow_flight::Result>;
    type ListActionsStream = BoxedStream<ActionType>;

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Self::HandshakeStream>, Status> {
        unsupported("Handshake")
    }
    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> std::result::Result<Response<Self::ListFlightsStream>, Status> {
        unsupported("ListFlights")
    }
    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        unsupported("GetFlightInfo")
    }
    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<PollInfo>, Status> {
        unsupported("PollFlightInfo")
    }
    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<SchemaResult>, Status> {
        unsupported("GetSchema")
    }
    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoExchangeStream>, Status> {
        unsupported("DoExchange")
    }
    /// `adopt` (body: the object id, a NUL, the file's name in the shared folder): the
    /// file becomes the object; answers its size. `locate` (body: the object id):
    /// answers the path of the object's file if it is a shared one, else nothing.
    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> std::result::Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        let body = std::str::from_utf8(&action.body)
            .map_err(|_| Status::invalid_argument("an action body must be UTF-8"))?;
        let answer = match action.r#type.as_str() {
            ACTION_ADOPT => {
                let (id, name) = body
                    .split_once('\0')
                    .ok_or_else(|| Status::invalid_argument("adopt: `id\\0file` expected"))?;
                let (id, name) = (id.to_string(), name.to_string());
                let bytes = self
                    .blocking(move |store| store.adopt(&id, &name))
                    .await?
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
                bytes.to_string()
            }
            ACTION_LOCATE => self
                .store
                .locate(body)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            other => return unsupported(&format!("the action {other:?}")),
        };
        let result = arrow_flight::Result {
            body: answer.into_bytes().into(),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(result)]))))
    }
    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        unsupported("ListActions")
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<Self::DoGetStream>, Status> {
        let (id, selection) = parse_ticket(&request.get_ref().ticket)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Unknown addresses (not TCP) count as this host.
        let remote = match (request.remote_addr(), request.local_addr()) {
            (Some(from), Some(here)) => from.ip() != here.ip(),
            _ => false,
        };
        let compression = self.store.compression().for_peer(remote);
        // The store writes its files with its own compression (`Auto`: none).
        let as_filed = self.store.compression().codec() == compression.codec();
        if let (Selection::Batch(i), true) = (selection, as_filed) {
            // A partition of a map output held as a file goes out as the file's own
            // IPC message, where its compression is the one the peer gets.
            let key = id.clone();
            let found = self
                .blocking(move |store| {
                    let path = store.locate(&key)?;
                    file_batch_messages(&path, i, compression).ok().flatten()
                })
                .await?;
            if let Some(messages) = found {
                return Ok(Response::new(Box::pin(futures::stream::iter(
                    messages.into_iter().map(Ok),
                ))));
            }
        }
        let not_here = || Status::not_found(format!("object {id} is not on this node"));
        let internal = |e: VolleyError| Status::internal(e.to_string());
        let key = id.clone();
        let found = self
            .blocking(move |store| match selection {
                Selection::Batch(i) => store.get_batch(&key, i),
                Selection::All | Selection::Whole | Selection::Rows { .. } => store
                    .get(&key)
                    .map(|all| all.map(|all| all.iter().cloned().collect())),
            })
            .await?;
        let batches: Vec<RecordBatch> = found.map_err(internal)?.ok_or_else(not_here)?;
        let batches = match selection {
            Selection::Rows { offset, rows } => slice_rows(&batches, offset, rows)
                .map_err(|e| Status::out_of_range(format!("object {id}: {e}")))?,
            Selection::All | Selection::Batch(_) | Selection::Whole => batches,
        };
        let schema = batches
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| Arc::new(Schema::empty()));
        // Whole: Flight sends no empty batch, so the schema message carries every
        // batch's rows and the reader puts the empty ones back (`fetch_whole`).
        let rows_per_batch = (selection == Selection::Whole).then(|| {
            batches
                .iter()
                .map(|b| b.num_rows().to_string())
                .collect::<Vec<_>>()
                .join(",")
        });
        let pieces = if selection == Selection::Whole {
            batches
                .into_iter()
                .filter(|b| b.num_rows() > 0)
                .map(volley_common::compact_bloated_views)
                .collect::<Result<Vec<_>>>()
        } else {
            for_flight(batches)
        };
        let items: Vec<std::result::Result<RecordBatch, FlightError>> = pieces
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(Ok)
            .collect();
        let mut encoder = flight_encoder(schema, compression).map_err(internal)?;
        if let Some(rows) = rows_per_batch {
            encoder = encoder.with_metadata(rows.into());
        }
        let stream = encoder
            .build(futures::stream::iter(items))
            .map_err(|e| Status::internal(e.to_string()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoPutStream>, Status> {
        let mut input = request.into_inner().peekable();
        let first = Pin::new(&mut input)
            .peek()
            .await
            .ok_or_else(|| Status::invalid_argument("DoPut with no data"))?;
        let (id, rows) = match first {
            Ok(data) => {
                let path = data
                    .flight_descriptor
                    .as_ref()
                    .map(|d| d.path.clone())
                    .unwrap_or_default();
                let id = path.first().cloned().ok_or_else(|| {
                    Status::invalid_argument("DoPut: the descriptor must name the object")
                })?;
                (id, path.get(1).cloned())
            }
            Err(e) => return Err(e.clone()),
        };
        let mut stream = FlightRecordBatchStream::new_from_flight_data(
            input.map_err(|e| FlightError::Tonic(Box::new(e))),
        );
        let mut pieces = Vec::new();
        while let Some(b) = stream
            .try_next()
            .await
            .map_err(|e| Status::invalid_argument(format!("DoPut {id}: {e}")))?
        {
            pieces.push(b);
        }
        // The sender's batches, as they were before they were cut to travel.
        let batches = match (rows, stream.schema()) {
            (Some(rows), Some(schema)) => super::transfer::regroup(schema, pieces, &rows)
                .map_err(|e| Status::invalid_argument(format!("DoPut {id}: {e}")))?,
            _ => pieces,
        };
        let bytes = self
            .blocking(move |store| store.put(&id, batches))
            .await?
            .map_err(|e| Status::internal(e.to_string()))?;
        let result = PutResult {
            app_metadata: bytes.to_string().into_bytes().into(),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(result)]))))
    }
}

/// A `DoGet` ticket: the object id, then `\0offset\0rows` for a slice or
/// `\0batch\0i` for one batch. Object ids never hold a NUL.
pub(super) fn ticket(id: &str, selection: Selection) -> Vec<u8> {
    match selection {
        Selection::All => id.as_bytes().to_vec(),
        Selection::Rows { offset, rows } => format!("{id}\0{offset}\0{rows}").into_bytes(),
        Selection::Batch(i) => format!("{id}\0batch\0{i}").into_bytes(),
        Selection::Whole => format!("{id}\0whole\00").into_bytes(),
    }
}

pub(super) fn parse_ticket(bytes: &[u8]) -> Result<(String, Selection)> {
    let text = String::from_utf8_lossy(bytes);
    let mut parts = text.split('\0');
    let id = parts.next().unwrap_or_default().to_string();
    let (Some(first), Some(second), None) = (parts.next(), parts.next(), parts.next()) else {
        return Ok((id, Selection::All));
    };
    let number = |s: &str| {
        s.parse::<u64>().map_err(|_| {
            VolleyError::plan(format!("ticket for object {id}: `{s}` is not a number"))
        })
    };
    let selection = if first == "whole" {
        Selection::Whole
    } else if first == "batch" {
        let i = number(second)?;
        Selection::Batch(u32::try_from(i).map_err(|_| {
            VolleyError::plan(format!("ticket for object {id}: batch {i} is out of range"))
        })?)
    } else {
        Selection::Rows {
            offset: number(first)?,
            rows: number(second)?,
        }
    };
    Ok((id.clone(), selection))
}
