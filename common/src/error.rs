//! The volley error type.

use std::fmt::Display;

use arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Result type used across volley.
pub type Result<T, E = VolleyError> = std::result::Result<T, E>;

/// Every error volley reports.
///
/// The variants are categories, as in DataFusion: a [`Plan`](VolleyError::Plan) error
/// is the user's mistake (an unknown column, a bad argument) and is found before any
/// data is read; [`Execution`](VolleyError::Execution) happens while data flows;
/// [`Internal`](VolleyError::Internal) is a bug in volley. Errors that happened at a
/// place worth naming (a file, an operator, a user function) are wrapped in
/// [`Context`](VolleyError::Context) so that the message reads from the outside in:
/// `reading data/a.parquet: Parquet error: ...`.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum VolleyError {
    /// The request cannot be planned: unknown column, wrong argument, bad option.
    #[error("{0}")]
    Plan(String),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Something failed while the data was flowing.
    #[error("{0}")]
    Execution(String),
    /// A user function (a `map_batches` transform, a predicate) returned an error or
    /// panicked.
    #[error("user function `{name}` failed: {message}")]
    UserFunction {
        /// The transform's name.
        name: String,
        /// What it reported (or its panic message).
        message: String,
    },
    /// The execution was cancelled (its consumer went away).
    #[error("execution cancelled")]
    Cancelled,
    /// A resource (memory, CPUs) cannot be had.
    #[error("resources exhausted: {0}")]
    ResourcesExhausted(String),
    /// A bug in volley.
    #[error("internal error (please report): {0}")]
    Internal(String),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// An Arrow error.
    #[error(transparent)]
    Arrow(#[from] ArrowError),
    /// An error from DataFusion (SQL planning, file scans, expressions).
    #[error("{}", display_datafusion(.0))]
    DataFusion(Box<DataFusionError>),
    /// An error from an object store.
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),
    /// An error with the place it happened: `{context}: {source}`.
    #[error("{context}: {source}")]
    Context {
        /// Where it happened, e.g. `reading s3://bucket/a.parquet`.
        context: String,
        /// What happened.
        source: Box<VolleyError>,
    },
}

/// `{:?}` prints the message, as `{}` does, so that a `main` returning
/// `volley::Result<()>` ends with one readable line; `{:#?}` shows the structure (the
/// category of every layer).
impl std::fmt::Debug for VolleyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !f.alternate() {
            return write!(f, "{self}");
        }
        match self {
            VolleyError::Context { context, source } => f
                .debug_struct("Context")
                .field("context", context)
                .field("source", source)
                .finish(),
            other => write!(f, "{:?}({other})", other.kind()),
        }
    }
}

/// The category of an error: what a caller (or a driver, for an error that happened in
/// another process) decides on. See [`VolleyError`] for what each means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The user's request cannot be planned.
    Plan,
    /// A configuration value is invalid.
    Config,
    /// Something failed while the data was flowing (including I/O, Arrow and file
    /// format errors).
    Execution,
    /// A user function returned an error or panicked.
    UserFunction,
    /// The work was cancelled.
    Cancelled,
    /// Memory, CPUs or another resource could not be had.
    ResourcesExhausted,
    /// A bug in volley.
    Internal,
}

/// A [`VolleyError`] as it crosses a process boundary (a cluster task's failure): its
/// category, the innermost error's own message, and the places it happened, outermost
/// first. [`VolleyError::from`] rebuilds an error of the same category, so a driver can
/// tell a cancelled task from a failing user function or a lack of resources.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorReport {
    /// The category.
    pub kind: ErrorKind,
    /// The innermost error's message, without its category's prefix.
    pub message: String,
    /// For a [`ErrorKind::UserFunction`] error: the function's name.
    pub function: Option<String>,
    /// The contexts around it, outermost first (`["task read-3", "reading a.parquet"]`).
    pub context: Vec<String>,
}

impl ErrorReport {
    /// A report of `kind` with `message` and no context.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            function: None,
            context: vec![],
        }
    }

    /// This report wrapped in one more context (the outermost).
    pub fn with_context(mut self, context: impl Into<String>) -> Self {
        self.context.insert(0, context.into());
        self
    }
}

impl From<&VolleyError> for ErrorReport {
    fn from(e: &VolleyError) -> Self {
        let mut context = Vec::new();
        let mut at = e;
        while let VolleyError::Context { context: c, source } = at {
            context.push(c.clone());
            at = source;
        }
        let (message, function) = match at {
            VolleyError::Plan(m)
            | VolleyError::Config(m)
            | VolleyError::Execution(m)
            | VolleyError::ResourcesExhausted(m)
            | VolleyError::Internal(m) => (m.clone(), None),
            VolleyError::UserFunction { name, message } => (message.clone(), Some(name.clone())),
            VolleyError::Cancelled => (String::new(), None),
            other => (other.to_string(), None),
        };
        Self {
            kind: at.kind(),
            message,
            function,
            context,
        }
    }
}

impl From<ErrorReport> for VolleyError {
    fn from(r: ErrorReport) -> Self {
        let root = match r.kind {
            ErrorKind::Plan => VolleyError::Plan(r.message),
            ErrorKind::Config => VolleyError::Config(r.message),
            ErrorKind::Execution => VolleyError::Execution(r.message),
            ErrorKind::UserFunction => VolleyError::UserFunction {
                name: r.function.unwrap_or_default(),
                message: r.message,
            },
            ErrorKind::Cancelled => VolleyError::Cancelled,
            ErrorKind::ResourcesExhausted => VolleyError::ResourcesExhausted(r.message),
            ErrorKind::Internal => VolleyError::Internal(r.message),
        };
        r.context.into_iter().rev().fold(root, |e, c| e.context(c))
    }
}

/// The sentence DataFusion ends its internal errors with.
const DATAFUSION_BUG: &str = "This issue was likely caused by a bug in DataFusion's code. \
    Please help us to resolve this by filing a bug report in our issue tracker: \
    https://github.com/apache/datafusion/issues";

/// DataFusion prefixes its messages with its own category names ("Error during
/// planning: ", "Arrow error: "); keep them, they help, but strip back-to-back
/// context wrappers that only repeat themselves.
fn display_datafusion(e: &DataFusionError) -> String {
    match e {
        DataFusionError::Context(ctx, inner) => format!("{ctx}: {}", display_datafusion(inner)),
        other => {
            // `Parquet error: Parquet error: ...`: DataFusion's category in front of a
            // message that already starts with it.
            let mut text = other.to_string();
            if !matches!(other, DataFusionError::Internal(_)) {
                // A user's mistake (`sum` of strings) that DataFusion tells as an
                // internal error inside a planning error: not a bug to report.
                text = text
                    .replacen(
                        "Error during planning: Internal error: ",
                        "Error during planning: ",
                        1,
                    )
                    .replace(&format!("\n{DATAFUSION_BUG}"), "");
            }
            match text.split_once(": ") {
                Some((head, rest)) if rest.starts_with(&format!("{head}: ")) => rest.to_string(),
                _ => text,
            }
        }
    }
}

impl From<DataFusionError> for VolleyError {
    fn from(e: DataFusionError) -> Self {
        match e {
            // A volley error that travelled through DataFusion (a volley dataset used as a
            // SQL table) comes back as itself.
            DataFusionError::External(inner) => match inner.downcast::<VolleyError>() {
                Ok(v) => *v,
                Err(other) => VolleyError::DataFusion(Box::new(DataFusionError::External(other))),
            },
            other => VolleyError::DataFusion(Box::new(other)),
        }
    }
}

impl From<VolleyError> for DataFusionError {
    fn from(e: VolleyError) -> Self {
        match e {
            VolleyError::DataFusion(inner) => *inner,
            other => DataFusionError::External(Box::new(other)),
        }
    }
}

impl From<parquet_error::ParquetError> for VolleyError {
    fn from(e: parquet_error::ParquetError) -> Self {
        VolleyError::DataFusion(Box::new(DataFusionError::ParquetError(Box::new(e))))
    }
}

mod parquet_error {
    pub use datafusion::parquet::errors::ParquetError;
}

impl VolleyError {
    /// A [`Plan`](VolleyError::Plan) error from anything printable.
    pub fn plan(msg: impl Display) -> Self {
        VolleyError::Plan(msg.to_string())
    }

    /// A [`Plan`](VolleyError::Plan) error for a `what` (a join key, a partition
    /// column) named `name` that `schema` lacks, listing the columns it has.
    pub fn unknown_column(what: &str, name: &str, schema: &arrow::datatypes::Schema) -> Self {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        VolleyError::Plan(format!(
            "{what} `{name}` is not a column (columns: {})",
            names.join(", ")
        ))
    }

    /// An [`Execution`](VolleyError::Execution) error from anything printable.
    pub fn execution(msg: impl Display) -> Self {
        VolleyError::Execution(msg.to_string())
    }

    /// An [`Internal`](VolleyError::Internal) error from anything printable.
    pub fn internal(msg: impl Display) -> Self {
        VolleyError::Internal(msg.to_string())
    }

    /// Wraps this error with the place it happened.
    pub fn context(self, context: impl Display) -> Self {
        VolleyError::Context {
            context: context.to_string(),
            source: Box::new(self),
        }
    }

    /// The innermost error, past every [`Context`](VolleyError::Context).
    pub fn root(&self) -> &VolleyError {
        match self {
            VolleyError::Context { source, .. } => source.root(),
            other => other,
        }
    }

    /// The category of the innermost error. Errors of the libraries volley uses (I/O,
    /// Arrow, object stores) are execution errors; DataFusion's are sorted by its own
    /// categories (planning, configuration, resources, internal, else execution).
    pub fn kind(&self) -> ErrorKind {
        match self.root() {
            VolleyError::Plan(_) => ErrorKind::Plan,
            VolleyError::Config(_) => ErrorKind::Config,
            VolleyError::UserFunction { .. } => ErrorKind::UserFunction,
            VolleyError::Cancelled => ErrorKind::Cancelled,
            VolleyError::ResourcesExhausted(_) => ErrorKind::ResourcesExhausted,
            VolleyError::Internal(_) => ErrorKind::Internal,
            VolleyError::DataFusion(e) => match e.find_root() {
                DataFusionError::Plan(_)
                | DataFusionError::SQL(..)
                | DataFusionError::SchemaError(..) => ErrorKind::Plan,
                DataFusionError::Configuration(_) => ErrorKind::Config,
                DataFusionError::ResourcesExhausted(_) => ErrorKind::ResourcesExhausted,
                DataFusionError::Internal(_) => ErrorKind::Internal,
                _ => ErrorKind::Execution,
            },
            _ => ErrorKind::Execution,
        }
    }

    /// Whether this error (under any context) is a cancellation.
    pub fn is_cancelled(&self) -> bool {
        matches!(self.root(), VolleyError::Cancelled)
    }
}

/// Adds [`context`](ResultExt::context) to any result whose error converts into a
/// [`VolleyError`].
pub trait ResultExt<T> {
    /// Wraps the error with the place it happened.
    fn context(self, context: impl Display) -> Result<T>;
    /// Like [`context`](ResultExt::context), with the message built only on error.
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E: Into<VolleyError>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, context: impl Display) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_reads_outside_in() {
        let e = VolleyError::execution("bad byte").context("reading a.parquet");
        assert_eq!(e.to_string(), "reading a.parquet: bad byte");
        assert!(matches!(e.root(), VolleyError::Execution(_)));
    }

    #[test]
    fn reports_keep_the_category_and_contexts() {
        let cases = [
            VolleyError::Cancelled.context("task t"),
            VolleyError::UserFunction {
                name: "f".into(),
                message: "boom".into(),
            }
            .context("reading a.parquet")
            .context("task t"),
            VolleyError::ResourcesExhausted("budget 1 MiB".into()),
            VolleyError::plan("no column x"),
            VolleyError::Config("bad".into()),
            VolleyError::internal("bug"),
        ];
        for e in cases {
            let report = ErrorReport::from(&e);
            let back = VolleyError::from(report.clone());
            assert_eq!(back.kind(), e.kind(), "{e}");
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(ErrorReport::from(&back), report);
        }
        let io = VolleyError::Io(std::io::Error::other("disk on fire")).context("writing x");
        let back = VolleyError::from(ErrorReport::from(&io));
        assert_eq!(back.kind(), ErrorKind::Execution);
        assert_eq!(back.to_string(), "writing x: disk on fire");
        let df = VolleyError::from(DataFusionError::ResourcesExhausted("full".into()));
        assert_eq!(df.kind(), ErrorKind::ResourcesExhausted);
    }

    #[test]
    fn debug_prints_the_message() {
        let e = VolleyError::plan("no column x").context("select");
        assert_eq!(format!("{e:?}"), "select: no column x");
        assert!(format!("{e:#?}").contains("Plan(no column x)"));
    }

    #[test]
    fn volley_error_round_trips_through_datafusion() {
        let df: DataFusionError = VolleyError::Cancelled.into();
        let back: VolleyError = df.into();
        assert!(back.is_cancelled());
    }
}
