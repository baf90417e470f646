//! SQL: DataFusion plans and runs it; volley datasets are its tables and its results
//! are volley datasets.

use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, DynamicFileCatalog, MemoryCatalogProvider,
    MemoryCatalogProviderList, MemorySchemaProvider, Session, TableProvider,
};
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, TableReference};
use datafusion::datasource::TableType;
use datafusion::execution::context::SessionState;
use datafusion::execution::memory_pool::MemoryLimit;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    Expr, LogicalPlan, LogicalPlanBuilder, TableProviderFilterPushDown,
};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::metrics::MetricsSet;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{displayable, ExecutionPlan, Partitioning};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, DFParserBuilder};
use futures::StreamExt;
use volley_common::{Result, ResultExt, VolleyError};
use volley_connectors::{DataSource, ReadTask, ScanRequest};

use crate::context::Context;
use crate::dataset::Dataset;
use crate::gather_sort::GatherSortExec;
use crate::handover::thread_stream;

/// SQL on a context: the statements are planned by DataFusion over its tables.
impl Context {
    /// Runs SQL over files and datasets: `tables` become named tables; paths in quotes
    /// (`FROM 'data/*.parquet'`) are read directly. Several `;`-separated statements
    /// may be given (`CREATE EXTERNAL TABLE`, `SET`); the last one is the result.
    pub fn sql(&self, query: &str, tables: &[(&str, &Dataset)]) -> Result<Dataset> {
        plan_sql(self, query, tables, &[], Statements::Run)
    }

    /// Registers files as a table that every later [`sql`](Context::sql) call of this
    /// context sees, as DataFusion's `register_parquet` does (format by extension as in
    /// [`sql_with_files`](Context::sql_with_files)). Lists the files and reads their
    /// schemas now, once; a name registered again is replaced.
    pub fn register_files(&self, name: &str, path: &str) -> Result<()> {
        // Named as SQL names it: `Orders` and `orders` are one table (quote a name
        // to keep its case), and a name of several parts names a schema, which
        // queries here do not have.
        let name = match TableReference::from(name) {
            TableReference::Bare { table } => table.to_string(),
            _ => {
                return Err(VolleyError::plan(format!(
                    "table name `{name}`: give one name, without a schema \
                     (quote it, \"{name}\", to keep its dots)"
                )))
            }
        };
        let table = file_table(self, path)?;
        self.register_table(&name, table);
        Ok(())
    }

    /// Runs SQL with files registered as tables: `[("lineitem", "data/lineitem/")]`
    /// (Parquet unless the path says `.csv`, `.json`, `.arrow`). DataFusion scans them
    /// directly.
    pub fn sql_with_files(&self, query: &str, files: &[(&str, &str)]) -> Result<Dataset> {
        plan_sql(self, query, &[], files, Statements::Run)
    }

    /// The plan of the last statement of `query`, as [`Dataset::explain`] shows it,
    /// with nothing run or written: the statements before it that only change the
    /// session (`SET`, `CREATE VIEW`, `CREATE EXTERNAL TABLE`, `DROP`) take effect,
    /// queries are planned, and a statement that writes or makes data (`INSERT`,
    /// `COPY`, `CREATE TABLE ... AS`) is refused, named (the last one may be an
    /// `INSERT` or a `COPY`: it is explained). `files` as in
    /// [`sql_with_files`](Context::sql_with_files).
    pub fn explain_sql(&self, query: &str, files: &[(&str, &str)]) -> Result<String> {
        plan_sql(self, query, &[], files, Statements::Plan)?.explain()
    }
}

/// A parser of `sql` in `dialect`.
fn parser<'a>(
    sql: &'a str,
    dialect: &'a dyn datafusion::sql::sqlparser::dialect::Dialect,
    recursion_limit: usize,
) -> datafusion::error::Result<DFParser<'a>> {
    DFParserBuilder::new(sql)
        .with_dialect(dialect)
        .with_recursion_limit(recursion_limit)
        .build()
}

/// The dialect named `name`, or an error listing those there are.
fn dialect(
    name: &datafusion::config::Dialect,
) -> datafusion::error::Result<Box<dyn datafusion::sql::sqlparser::dialect::Dialect>> {
    datafusion::sql::sqlparser::dialect::dialect_from_str(name).ok_or_else(|| {
        datafusion::error::DataFusionError::Plan(format!(
            "unknown SQL dialect {name} (datafusion.sql_parser.dialect): one of {}",
            datafusion::config::Dialect::available()
        ))
    })
}

/// Every statement of `sql`.
fn parse_script(
    sql: &str,
    name: &datafusion::config::Dialect,
    recursion_limit: usize,
) -> datafusion::error::Result<std::collections::VecDeque<datafusion::sql::parser::Statement>> {
    let dialect = dialect(name)?;
    parser(sql, dialect.as_ref(), recursion_limit)?.parse_statements()
}

/// The next statement of `script` from byte `at` (which then moves past it) and
/// whether it is the last one; `None` where only `;`s and blanks are left. Only the
/// statement's own text must be valid in `name`'s dialect: the rest is tokenized again
/// in the dialect the statement leaves.
fn next_statement(
    script: &str,
    at: &mut usize,
    name: &datafusion::config::Dialect,
    recursion_limit: usize,
) -> datafusion::error::Result<Option<(datafusion::sql::parser::Statement, bool)>> {
    use datafusion::sql::sqlparser::parser::ParserError;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let dialect = dialect(name)?;
    // The rest of the script, after blanks that put it at its place in the script:
    // errors give the script's lines and columns, not the rest's.
    let before = &script[..*at];
    let lines = before.matches('\n').count();
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count());
    let pad = lines + column;
    let rest = format!(
        "{}{}{}",
        "\n".repeat(lines),
        " ".repeat(column),
        &script[*at..]
    );
    let mut tokens = Vec::new();
    // A tokenizer error past the statement's `;` is the next statement's to report.
    let tokenized =
        Tokenizer::new(dialect.as_ref(), &rest).tokenize_with_location_into_buf(&mut tokens);
    let blank = |t: &Token| matches!(t, Token::SemiColon | Token::Whitespace(_));
    let Some(start) = tokens.iter().position(|t| !blank(&t.token)) else {
        tokenized.map_err(ParserError::from)?;
        return Ok(None);
    };
    let (end, is_last) = match tokens[start..]
        .iter()
        .position(|t| t.token == Token::SemiColon)
    {
        Some(i) => {
            let end = start + i;
            let more = tokens[end..].iter().any(|t| !blank(&t.token)) || tokenized.is_err();
            (end, !more)
        }
        None => {
            tokenized.map_err(ParserError::from)?;
            (tokens.len(), true)
        }
    };
    let cut = match tokens.get(end) {
        Some(t) => byte_offset(&rest, t.span.start.line, t.span.start.column),
        None => rest.len(),
    };
    tokens.truncate(end);
    let mut statements = DFParserBuilder::new(tokens)
        .with_dialect(dialect.as_ref())
        .with_recursion_limit(recursion_limit)
        .build()?
        .parse_statements()?;
    let statement = statements.pop_front().ok_or_else(|| {
        datafusion::error::DataFusionError::Internal("a statement without tokens".into())
    })?;
    *at += cut - pad;
    Ok(Some((statement, is_last)))
}

/// The byte offset in `text` of the character at `line` and `column` (both from 1,
/// columns in characters, as the SQL tokenizer counts them).
fn byte_offset(text: &str, line: u64, column: u64) -> usize {
    let mut at = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i as u64 + 1 == line {
            return at
                + l.char_indices()
                    .nth(column.saturating_sub(1) as usize)
                    .map_or(l.len(), |(b, _)| b);
        }
        at += l.len();
    }
    text.len()
}

/// What [`plan_sql`] does with the statements of a script.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Statements {
    /// Those before the last run to their end, in order; the last one is the result.
    Run,
    /// Only those that change the session run (to plan the last one); none writes.
    Plan,
}

/// Whether `plan`, taken as a statement, writes or makes data: what explaining a
/// script must not run. The last statement's `INSERT` or `COPY` is only planned;
/// `CREATE TABLE ... AS` runs its query as soon as it is taken, wherever it stands.
fn writes_data(plan: &LogicalPlan, is_last: bool) -> bool {
    use datafusion::logical_expr::DdlStatement;
    match plan {
        LogicalPlan::Dml(_) | LogicalPlan::Copy(_) => !is_last,
        LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(c)) => {
            !matches!(&*c.input, LogicalPlan::EmptyRelation(e) if !e.produce_one_row)
        }
        _ => false,
    }
}

/// Plans `query` (one or more statements) with `tables` registered.
pub(crate) fn plan_sql(
    ctx: &Context,
    query: &str,
    tables: &[(&str, &Dataset)],
    files: &[(&str, &str)],
    statements: Statements,
) -> Result<Dataset> {
    // A catalog of its own: the tables of one query do not leak into another.
    let catalogs = Arc::new(MemoryCatalogProviderList::new());
    let catalog = MemoryCatalogProvider::new();
    catalog
        .register_schema("public", Arc::new(MemorySchemaProvider::new()))
        .map_err(VolleyError::from)?;
    catalogs.register_catalog("datafusion".to_string(), Arc::new(catalog));
    let state = SessionStateBuilder::new_from_existing(ctx.session_state().clone())
        .with_catalog_list(catalogs)
        .build();
    // Paths in quotes (`FROM 'data/*.parquet'`) become file tables.
    let files_in_quotes = Arc::new(volley_connectors::FileTableFactory::new(
        ctx.session_state().clone(),
    ));
    let catalogs = Arc::new(DynamicFileCatalog::new(
        Arc::clone(state.catalog_list()),
        Arc::clone(&files_in_quotes) as _,
    ));
    let state = SessionStateBuilder::new_from_existing(state)
        .with_catalog_list(catalogs)
        .build();
    let sctx = SessionContext::new_with_state(state);
    let session = sctx.state_weak_ref();
    files_in_quotes.follow(move || session.upgrade().map(|s| s.read().clone()));
    // The context's tables first: a table given to this query of the same name
    // replaces one of them.
    for (name, table) in ctx.registered_tables() {
        sctx.register_table(TableReference::bare(name.as_str()), table)
            .with_context(|| format!("registering table `{name}`"))?;
    }
    // Compared resolved: `public.t` and `datafusion.public.t` name the context's `t`.
    let catalog = sctx.state().config().options().catalog.clone();
    let resolve = |r: TableReference| r.resolve(&catalog.default_catalog, &catalog.default_schema);
    let replaced = ctx
        .registered_tables()
        .into_iter()
        .map(|(n, _)| resolve(TableReference::bare(n)))
        .collect::<Vec<_>>();
    let register = |name: &str, table: Arc<dyn TableProvider>| {
        let reference = TableReference::from(name);
        if replaced.contains(&resolve(reference.clone())) {
            sctx.deregister_table(reference.clone())?;
        }
        sctx.register_table(reference, table)
    };
    for (name, ds) in tables {
        register(name, Arc::new(DatasetTable::try_new((*ds).clone())?))
            .with_context(|| format!("registering table `{name}`"))?;
    }
    for (name, path) in files {
        let table = file_table(ctx, path)?;
        register(name, table).with_context(|| format!("registering table `{name}` = {path}"))?;
    }
    let mode = statements;
    // The parser's own sentence ("sql parser error: Expected: ..."), not the enum
    // DataFusion's message wraps it in.
    let parse_error = |e: datafusion::error::DataFusionError| {
        VolleyError::plan(match &e {
            datafusion::error::DataFusionError::SQL(p, _) => p.to_string(),
            e => format!("SQL error: {e}"),
        })
    };
    // The whole script parses before any of it runs (a typo in the last statement
    // runs none before it), unless it sets a parser option: then each statement is
    // parsed in the dialect the statements before it set, as it comes.
    let mut parsed = if query.to_ascii_lowercase().contains("sql_parser") {
        None
    } else {
        let state = sctx.state();
        let options = &state.config().options().sql_parser;
        Some(
            parse_script(query, &options.dialect, options.recursion_limit.get())
                .map_err(parse_error)?,
        )
    };
    let mut at = 0;
    let mut last = None;
    for i in 0.. {
        let next = match &mut parsed {
            Some(all) => all.pop_front().map(|s| (s, all.is_empty())),
            None => {
                let state = sctx.state();
                let options = &state.config().options().sql_parser;
                next_statement(
                    query,
                    &mut at,
                    &options.dialect,
                    options.recursion_limit.get(),
                )
                .map_err(|e| {
                    let e = parse_error(e);
                    if i > 0 {
                        e.context(format!("in statement {}", i + 1))
                    } else {
                        e
                    }
                })?
            }
        };
        let Some((statement, is_last)) = next else {
            break;
        };
        let text = statement.to_string();
        let plan = ctx
            .exec_context()
            .block_on(async {
                let state = sctx.state();
                let plan = state.statement_to_plan(statement).await?;
                if let Some(refused) = refused_setting(&plan) {
                    return Err(datafusion::error::DataFusionError::Plan(refused));
                }
                if mode == Statements::Plan && writes_data(&plan, is_last) {
                    return Err(datafusion::error::DataFusionError::Plan(
                        "explaining runs no statement that writes or makes data \
                         (CREATE TABLE ... AS; INSERT or COPY before the last)"
                            .into(),
                    ));
                }
                if mode == Statements::Plan && matches!(plan, LogicalPlan::Analyze(_)) {
                    return Err(datafusion::error::DataFusionError::Plan(
                        "EXPLAIN ANALYZE runs its query; explaining runs nothing (run it \
                         without --explain)"
                            .into(),
                    ));
                }
                // DDL (CREATE EXTERNAL TABLE, SET, DROP) takes effect now; a query,
                // an INSERT or a COPY is only planned.
                let df = sctx.execute_logical_plan(plan).await?;
                let plan = df.logical_plan().clone();
                if !is_last && mode == Statements::Run {
                    // A statement before the last runs to its end here, in order (an
                    // INSERT or a COPY writes, a query's errors show), its rows
                    // dropped: the last one's rows are the answer.
                    df.collect().await?;
                }
                Ok::<_, datafusion::error::DataFusionError>(plan)
            })
            .map_err(|e| {
                let e = VolleyError::from(e);
                if i > 0 || !is_last {
                    e.context(format!("in statement {} `{text}`", i + 1))
                } else {
                    e
                }
            })?;
        last = Some(plan);
    }
    let Some(plan) = last else {
        return Err(VolleyError::plan("no SQL statement given"));
    };
    let mut words: Vec<&str> = query.split_whitespace().collect();
    if matches!(plan, LogicalPlan::Explain(_) | LogicalPlan::Analyze(_)) {
        // Its operators are the explained query's: labelled without `EXPLAIN ...`.
        words = explained_words(words);
    }
    let q = words.join(" ");
    let label = match q.char_indices().nth(79) {
        Some((i, _)) => format!("{}…", &q[..i]),
        None => q,
    };
    match plan {
        LogicalPlan::Explain(explain) => explain_statement(ctx, &sctx.state(), &explain, label),
        LogicalPlan::Analyze(analyze) => analyze_statement(ctx, &sctx.state(), &analyze, label),
        plan => Ok(ctx.source(Arc::new(plan_source(ctx, &sctx.state(), plan, label)))),
    }
}

/// Why a `SET` or `RESET` is refused, if it is:
///
/// - Of `datafusion.runtime.*`: DataFusion would give the query's session a runtime of
///   its own (memory limit, temporary folder), which volley's partitions never run in:
///   they take the executor's pool and spill folder, so such a statement is refused
///   rather than taking no effect.
/// - A batch size or target partitions past what volley runs
///   ([`volley_common::MAX_BATCH_SIZE`],
///   [`volley_common::MAX_TARGET_PARTITIONS`]): DataFusion's operators would
///   reserve memory by them outside any budget, up to ending the process.
fn refused_setting(plan: &LogicalPlan) -> Option<String> {
    use datafusion::logical_expr::Statement;
    use volley_common::{MAX_BATCH_SIZE, MAX_TARGET_PARTITIONS};
    let (variable, value) = match plan {
        LogicalPlan::Statement(Statement::SetVariable(s)) => (&s.variable, Some(&s.value)),
        LogicalPlan::Statement(Statement::ResetVariable(r)) => (&r.variable, None),
        _ => return None,
    };
    let key = variable.to_ascii_lowercase();
    if key.starts_with("datafusion.runtime.") {
        return Some(format!(
            "`{variable}` cannot be set from SQL: volley's partitions run in its executor's \
             memory pool and spill folder, not the query's runtime. Give them with \
             --memory-limit and --spill-dir (`volley sql`), or volley.exec.memory_limit and \
             volley.exec.spill_dir (VOLLEY_EXEC_MEMORY_LIMIT, VOLLEY_EXEC_SPILL_DIR)"
        ));
    }
    let (most, what) = match key.as_str() {
        "datafusion.execution.batch_size" => (MAX_BATCH_SIZE, "rows per batch"),
        "datafusion.execution.target_partitions" => (MAX_TARGET_PARTITIONS, "partitions"),
        _ => return None,
    };
    // A value that is no count is DataFusion's to refuse.
    let n: usize = value?.trim().parse().ok()?;
    (n > most).then(|| {
        format!(
            "`{variable}` = {n}: volley runs at most {most} {what} (DataFusion's operators \
             reserve memory by it outside the memory limit)"
        )
    })
}

/// `words` of statements that end in `EXPLAIN [ANALYZE] [VERBOSE] [FORMAT f] query`,
/// without that `EXPLAIN` clause: the words after the last statement's first word
/// `EXPLAIN` (the last statement starts after the last `;` followed by more words).
fn explained_words(words: Vec<&str>) -> Vec<&str> {
    let last = words[..words.len().saturating_sub(1)]
        .iter()
        .rposition(|w| w.ends_with(';'))
        .map_or(0, |i| i + 1);
    if !words
        .get(last)
        .is_some_and(|w| w.eq_ignore_ascii_case("explain"))
    {
        return words;
    }
    let mut rest = last + 1;
    while let Some(w) = words.get(rest) {
        if w.eq_ignore_ascii_case("analyze") || w.eq_ignore_ascii_case("verbose") {
            rest += 1;
        } else if w.eq_ignore_ascii_case("format") {
            rest += 2;
        } else {
            break;
        }
    }
    let mut kept = words[..last].to_vec();
    kept.extend_from_slice(words.get(rest..).unwrap_or_default());
    kept
}

/// The source of a query's rows: its plan, run through [`PlanSource`].
fn plan_source(
    ctx: &Context,
    state: &SessionState,
    plan: LogicalPlan,
    label: String,
) -> PlanSource {
    let ordered = ends_in_order(&plan);
    PlanSource::new(ctx, state.clone(), plan, "Sql", label, ordered)
}

/// Whether a query ends in ORDER BY (or a LIMIT), maybe under the projection of its
/// select list (`SELECT a FROM t ORDER BY b`) or an alias: its rows then stream in
/// that order, and the steps after it keep it.
fn ends_in_order(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => true,
        LogicalPlan::Projection(p) => ends_in_order(&p.input),
        LogicalPlan::SubqueryAlias(a) => ends_in_order(&a.input),
        _ => false,
    }
}

/// `EXPLAIN query`: the plan volley runs, not DataFusion's. DataFusion's own
/// `EXPLAIN` shows the physical plan its planner makes; volley rewrites that plan
/// (partitions per CPU, [`GatherSortExec`], stages on a cluster) before it runs it, so
/// its rows are DataFusion's optimized logical plan (and with `VERBOSE` the initial
/// one) and volley's operators with the physical plan each runs, as `explain` on a
/// dataset shows them. Planned now, as DataFusion's `EXPLAIN` is; nothing is read.
fn explain_statement(
    ctx: &Context,
    state: &SessionState,
    explain: &datafusion::logical_expr::Explain,
    label: String,
) -> Result<Dataset> {
    indent_format(&explain.explain_format)?;
    let inner = explain.plan.as_ref().clone();
    let optimized = state.optimize(&inner)?;
    let physical = ctx
        .source(Arc::new(plan_source(ctx, state, inner.clone(), label)))
        .physical()?;
    let mut rows = Vec::new();
    if explain.verbose {
        rows.push(("initial_logical_plan", inner.display_indent().to_string()));
    }
    rows.push(("logical_plan", optimized.display_indent().to_string()));
    rows.push(("physical_plan", physical.to_string()));
    plan_rows(ctx, rows)
}

/// `EXPLAIN ANALYZE query`: runs the query through volley (now, when it is planned:
/// its rows are counted and dropped) and shows the physical plan it ran with
/// DataFusion's metrics, and volley's statistics per operator. On a cluster the
/// metrics are those of the plan the command ran; the stages below it are shown as
/// planned.
fn analyze_statement(
    ctx: &Context,
    state: &SessionState,
    analyze: &datafusion::logical_expr::Analyze,
    label: String,
) -> Result<Dataset> {
    indent_format(&analyze.format)?;
    let source = Arc::new(plan_source(
        ctx,
        state,
        analyze.input.as_ref().clone(),
        label,
    ));
    let ds = ctx.source(Arc::clone(&source) as Arc<dyn DataSource>);
    let mut output_rows = 0;
    for batch in ds.iter_batches()? {
        output_rows += batch?.num_rows();
    }
    let mut rows = Vec::new();
    if let Some(plan) = source.executed.lock().expect("plans lock").as_ref() {
        let shown = datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(
            plan.as_ref(),
        )
        .indent(analyze.verbose)
        .to_string();
        // On a cluster the stages below ran as tasks on the nodes: shown as planned
        // (their operators' metrics stay with the tasks).
        let stages = crate::runner::ClusterStageExec::describe_stages(plan);
        rows.push(("Plan with Metrics", format!("{shown}{stages}")));
    }
    let stats = ds.stats().map_or_else(String::new, |s| s.to_string());
    rows.push(("Execution", format!("{stats}\noutput rows: {output_rows}")));
    plan_rows(ctx, rows)
}

/// `EXPLAIN`'s formats other than the default indented text are DataFusion's own
/// renderings of its physical plan, which is not the plan volley runs.
fn indent_format(format: &datafusion::common::format::ExplainFormat) -> Result<()> {
    use datafusion::common::format::ExplainFormat;
    match format {
        ExplainFormat::Indent => Ok(()),
        other => Err(VolleyError::plan(format!(
            "EXPLAIN FORMAT {other}: volley shows the plan it runs as indented text only; \
             leave out FORMAT"
        ))),
    }
}

/// `EXPLAIN`'s result: the columns `plan_type` and `plan`, one row per plan.
fn plan_rows(ctx: &Context, rows: Vec<(&str, String)>) -> Result<Dataset> {
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("plan_type", DataType::Utf8, false),
        Field::new("plan", DataType::Utf8, false),
    ]));
    let types = StringArray::from_iter_values(rows.iter().map(|(t, _)| *t));
    let plans = StringArray::from_iter_values(rows.iter().map(|(_, p)| p.as_str()));
    let batch = arrow::array::RecordBatch::try_new(schema, vec![Arc::new(types), Arc::new(plans)])?;
    ctx.from_batches(vec![batch])
}

/// Files as a DataFusion table (see [`volley_connectors::file_table`]): the format
/// follows the path's extension (Parquet unless it says `.csv`, `.json`/`.ndjson`/
/// `.jsonl`, `.arrow`/`.ipc`/`.feather`); view string columns are read as plain strings.
/// Lists the files and reads their schemas now, naming the file of any error.
pub(crate) fn file_table(ctx: &Context, path: &str) -> Result<Arc<dyn TableProvider>> {
    ctx.exec_context()
        .block_on(volley_connectors::file_table(ctx.session_state(), path))
}

/// A DataFusion logical plan as a dataset source: one read task per output partition
/// of its physical plan. SQL results and the Dataset API's sort, aggregation, join and
/// distinct run this way, on DataFusion's operators (external sort, spilling hash
/// aggregation, hash join) and its exchanges, under the context's memory budget.
#[derive(Debug)]
pub(crate) struct PlanSource {
    ctx: Context,
    state: SessionState,
    plan: LogicalPlan,
    schema: SchemaRef,
    name: String,
    label: String,
    ordered: bool,
    /// The physical plan of the latest execution (its metrics are what stats report).
    executed: Mutex<Option<Arc<dyn ExecutionPlan>>>,
}

impl PlanSource {
    pub(crate) fn new(
        ctx: &Context,
        state: SessionState,
        plan: LogicalPlan,
        name: &str,
        label: String,
        ordered: bool,
    ) -> Self {
        Self {
            ctx: ctx.clone(),
            state,
            schema: Arc::new(plan.schema().as_arrow().clone()),
            plan,
            name: name.to_string(),
            label,
            ordered,
            executed: Mutex::new(None),
        }
    }

    fn projected(&self, request: &ScanRequest) -> Result<LogicalPlan> {
        let mut plan = self.plan.clone();
        if let Some(p) = &request.projection {
            let cols: Vec<Expr> = p
                .iter()
                .map(|&i| Expr::Column(Column::from(plan.schema().qualified_field(i))))
                .collect();
            plan = LogicalPlanBuilder::from(plan).project(cols)?.build()?;
        }
        Ok(plan)
    }

    /// `plan` planned for a cluster whose exchanges have `partitions` partitions, and a
    /// join side estimated below `broadcast` bytes collected (read whole by each task).
    async fn cluster_plan(
        &self,
        plan: &LogicalPlan,
        partitions: usize,
        broadcast: u64,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut config = self.state.config().clone();
        let options = config.options_mut();
        options.execution.target_partitions = partitions;
        // Whole partitions travel; spreading batches round robin here would
        // make every partition depend on every task.
        options.optimizer.enable_round_robin_repartition = false;
        // A join's dynamic filter is placed, so that one crossing an exchange
        // is filled from the join's collected side before the stage below it
        // runs (`KeysFilter`); the others are left out of the stages' plans
        // (a join's waits for every partition of the join, each a task of its
        // own). A top-k's and an aggregation's would be filled by one
        // partition of many.
        options.optimizer.enable_topk_dynamic_filter_pushdown = false;
        options.optimizer.enable_aggregate_dynamic_filter_pushdown = false;
        // A join's side estimated (from the files' statistics) below the
        // broadcast limit is collected and read whole by every task of the
        // join, so that the other side is not exchanged. In one process the
        // collected side is built once and shared, and DataFusion's smaller
        // defaults fit that; here each task builds it, but an exchange costs
        // more than that: the big side's rows written, fetched and read again.
        options.optimizer.hash_join_single_partition_threshold =
            usize::try_from(broadcast).unwrap_or(usize::MAX);
        options.optimizer.hash_join_single_partition_threshold_rows =
            usize::try_from(broadcast / 8).unwrap_or(usize::MAX);
        let state = SessionStateBuilder::new_from_existing(self.state.clone())
            .with_config(config.clone())
            .build();
        let mut physical = state.create_physical_plan(plan).await?;
        // A left outer, semi or anti join with its left side collected needs
        // all of its right side's matches in one task: such joins run as
        // semi-join reductions when cut into stages, a full one is
        // hash-partitioned on both sides here; the other joins keep a small
        // side collected (broadcast).
        physical = crate::runner::partition_collected_joins(physical)?;
        if crate::runner::finishes_collected_side(&physical) {
            // One that cannot be (a nested-loop or a null-aware anti join):
            // planned again with no side collected.
            let options = config.options_mut();
            options.optimizer.hash_join_single_partition_threshold = 0;
            options.optimizer.hash_join_single_partition_threshold_rows = 0;
            let state = SessionStateBuilder::new_from_existing(self.state.clone())
                .with_config(config)
                .build();
            physical = state.create_physical_plan(plan).await?;
        }
        Ok(physical)
    }

    /// `plan` planned to run in this process, in the context's partitions
    /// ([`crate::context::default_partitions`]: more than CPUs), with two exceptions
    /// where they are the default (not chosen in the options or by `SET`), planned in
    /// one partition per CPU instead:
    ///
    /// - A plan that sorts rows whole ([`sorts_rows`]): its final merge runs on one
    ///   core and compares every row across the sorted partitions, so more of them
    ///   cost that core more than the sorts gain (TPC-H `lineitem` sorted to Parquet on
    ///   2 CPUs: 3.69 s in 3 partitions against 3.54 s in 2, medians of 5).
    /// - A plan that ends in more partitions than CPUs and exchanges no rows between
    ///   them (scans, filters, joins with a collected side): the executor reads each
    ///   output partition in a task of its own, one per CPU at a time, so a third
    ///   partition on 2 CPUs would run after the others, alone.
    ///
    /// A plan that exchanges rows and ends in more partitions than CPUs ends in one
    /// per CPU, dealt its batches in turn: its rows' order across partitions was set
    /// by timing already. (Where partitions are chosen, a plan that exchanges no rows
    /// keeps them: its partitions are read in order, as many at a time as CPUs.)
    async fn local_plan(&self, plan: &LogicalPlan) -> Result<Arc<dyn ExecutionPlan>> {
        let mut physical = self.state.create_physical_plan(plan).await?;
        let cpus = self.ctx.cpus();
        let partitions = self.state.config().target_partitions();
        let chosen = self.ctx.config().exec.target_partitions.is_some()
            || partitions != crate::context::default_partitions(cpus);
        let parts = |p: &Arc<dyn ExecutionPlan>| p.properties().partitioning.partition_count();
        let exchanges = |p: &Arc<dyn ExecutionPlan>| {
            p.exists(|n| Ok(n.downcast_ref::<RepartitionExec>().is_some()))
                .unwrap_or(true)
        };
        let one_per_cpu =
            sorts_rows(&physical) || (parts(&physical) > cpus && !exchanges(&physical));
        if !chosen && partitions > cpus && one_per_cpu {
            let mut config = self.state.config().clone();
            config.options_mut().execution.target_partitions = cpus;
            let state = SessionStateBuilder::new_from_existing(self.state.clone())
                .with_config(config)
                .build();
            physical = state.create_physical_plan(plan).await?;
        }
        let budget_per_cpu = self.ctx.exec_context().budget.limit() / cpus as u64;
        if self.ctx.config().plan.cache_sized_aggregations
            && budget_per_cpu >= crate::cache_sized_aggregation::MIN_BUDGET_PER_CPU
        {
            physical = crate::cache_sized_aggregation::cache_sized_aggregations(physical)?;
        }
        if self.ctx.config().plan.gather_sorts && sorts_rows(&physical) {
            physical = crate::gather_sort::gather_sorts(physical)?;
        }
        if parts(&physical) > cpus && exchanges(&physical) {
            physical = Arc::new(RepartitionExec::try_new(
                physical,
                Partitioning::RoundRobinBatch(cpus),
            )?);
        }
        Ok(physical)
    }

    async fn physical(&self, request: &ScanRequest) -> Result<Arc<dyn ExecutionPlan>> {
        let plan = self.projected(request)?;
        let mut physical = match self.ctx.cluster() {
            None => self.local_plan(&plan).await?,
            // On a cluster: planned for its exchanges' partitions and cut into stages
            // that run on its nodes; where it cannot be cut, its file scans run there.
            Some(cluster) => {
                // The cluster's calls block: asked from a thread of their own.
                let config = self.ctx.config();
                let (few, many) = std::thread::scope(|s| {
                    s.spawn(|| crate::runner::query_partitions(cluster, config))
                        .join()
                })
                .map_err(|_| VolleyError::internal("asking the cluster for its CPUs"))?;
                let broadcast = config.exec.broadcast_join_bytes;
                // What the query's `SET`s changed travels with its tasks.
                let settings = Arc::new(crate::runner::SessionSettings::changed(
                    self.ctx.session_state().config_options(),
                    self.state.config_options(),
                ));
                let mut physical = self.cluster_plan(&plan, few, broadcast).await?;
                if many > few
                    && crate::runner::scanned_bytes(&physical)
                        > few as u64 * crate::runner::SMALL_QUERY_BYTES_PER_CPU
                {
                    physical = self.cluster_plan(&plan, many, broadcast).await?;
                }
                let staged = if crate::runner::scans_files(&physical) {
                    crate::runner::stages_on_cluster(&physical, cluster, &settings)?
                } else {
                    None
                };
                match staged {
                    Some(staged) => staged,
                    None => crate::runner::scans_on_cluster(
                        self.state.create_physical_plan(&plan).await?,
                        cluster,
                        &settings,
                    )?,
                }
            }
        };
        // Errors met while reading a file here name it.
        physical = volley_connectors::name_file_errors(physical)?;
        let parts = physical.properties().partitioning.partition_count();
        let cpus = self.state.config().target_partitions();
        if parts > cpus {
            physical = Arc::new(CoalescePartitionsExec::new(physical));
        }
        Ok(physical)
    }
}

/// Sums a metric over a physical plan and its children.
fn sum_metric(plan: &Arc<dyn ExecutionPlan>, pick: &dyn Fn(&MetricsSet) -> Option<usize>) -> u64 {
    let own = plan.metrics().as_ref().and_then(pick).unwrap_or(0) as u64;
    own + plan
        .children()
        .iter()
        .map(|c| sum_metric(c, pick))
        .sum::<u64>()
}

#[async_trait::async_trait]
impl DataSource for PlanSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn describe(&self) -> String {
        self.label.clone()
    }

    fn ordered(&self) -> bool {
        self.ordered
    }

    fn logical_plan(&self) -> Option<LogicalPlan> {
        Some(self.plan.clone())
    }

    fn logical_detail(&self, request: &ScanRequest, optimized: bool) -> Option<String> {
        if !optimized {
            return Some(self.plan.display_indent().to_string());
        }
        Some(
            match self
                .projected(request)
                .and_then(|p| Ok(self.state.optimize(&p)?))
            {
                Ok(plan) => plan.display_indent().to_string(),
                Err(e) => format!("(cannot optimize: {e})"),
            },
        )
    }

    fn explain_detail(&self, request: &ScanRequest) -> Option<String> {
        let physical = self.ctx.exec_context().block_on(self.physical(request));
        Some(match physical {
            Ok(p) => {
                let here = displayable(p.as_ref()).indent(true).to_string();
                let stages = crate::runner::ClusterStageExec::describe_stages(&p);
                if stages.is_empty() {
                    here
                } else {
                    format!("{here}{stages}")
                }
            }
            Err(e) => format!("(cannot plan: {e})"),
        })
    }

    fn spilled_bytes(&self) -> u64 {
        self.executed
            .lock()
            .expect("plans lock")
            .as_ref()
            .map_or(0, |p| sum_metric(p, &|m| m.spilled_bytes()))
    }

    async fn plan(&self, _state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        let physical = self.physical(request).await?;
        *self.executed.lock().expect("plans lock") = Some(Arc::clone(&physical));
        let parts = physical.properties().partitioning.partition_count();
        let sorts_rows = sorts_rows(&physical);
        let sort_partitions = sort_partitions(&physical);
        let suspects = Arc::new(Suspects::of(&self.plan));
        let config = self.state.config().clone();
        Ok((0..parts)
            .map(|i| {
                let plan = Arc::clone(&physical);
                let suspects = Arc::clone(&suspects);
                let config = config.clone();
                ReadTask::new(format!("{} partition {i}", self.name), 0, move |ctx| {
                    let rows = match sorts_rows && roomy(&ctx, sort_partitions) {
                        true => SORT_BATCH_ROWS,
                        false => 0,
                    };
                    let ctx = with_config(&ctx, &config, rows);
                    let stream = plan.execute(i, ctx)?;
                    if suspects.is_empty() {
                        return Ok(stream);
                    }
                    let suspects = Arc::clone(&suspects);
                    Ok(Box::pin(RecordBatchStreamAdapter::new(
                        stream.schema(),
                        stream.map(move |r| r.map_err(|e| suspects.name(e))),
                    )) as SendableRecordBatchStream)
                })
                // Its scans name their files, its divisions and casts their
                // expressions: the partition's label would only stand in front of them.
                .naming_its_errors()
            })
            .collect())
    }
}

/// The expressions of a plan whose failures Arrow reports without saying where:
/// divisions and remainders (by zero) and casts (of a value the type cannot hold), as
/// written (subqueries included).
#[derive(Debug, Default)]
struct Suspects {
    divisions: Vec<String>,
    casts: Vec<String>,
}

impl Suspects {
    fn of(plan: &LogicalPlan) -> Self {
        use datafusion::logical_expr::{BinaryExpr, Cast, Operator};
        let mut found = Suspects::default();
        let add = |list: &mut Vec<String>, e: &Expr| {
            let text = without_path_qualifiers(e).to_string();
            if !list.contains(&text) {
                list.push(text);
            }
        };
        let _ = plan.apply_with_subqueries(|node| {
            node.apply_expressions(|e| {
                e.apply(|x| {
                    match x {
                        Expr::BinaryExpr(BinaryExpr { op, right, .. })
                            if matches!(op, Operator::Divide | Operator::Modulo)
                                && !nonzero(right) =>
                        {
                            add(&mut found.divisions, x)
                        }
                        Expr::Cast(Cast { expr, .. }) if !matches!(**expr, Expr::Literal(..)) => {
                            add(&mut found.casts, x)
                        }
                        _ => {}
                    }
                    Ok(TreeNodeRecursion::Continue)
                })
            })
        });
        found
    }

    fn is_empty(&self) -> bool {
        self.divisions.is_empty() && self.casts.is_empty()
    }

    /// `e` with the expressions that may have caused it, when it is a division by
    /// zero or a failed cast of this plan's own (one from a volley Dataset read as a
    /// table already says where).
    fn name(&self, e: datafusion::error::DataFusionError) -> datafusion::error::DataFusionError {
        let volley = match e.find_root() {
            datafusion::error::DataFusionError::External(inner) => {
                inner.downcast_ref::<VolleyError>()
            }
            _ => None,
        };
        let (what, list) = match volley {
            Some(v) if remote_failure(v, "Divide by zero error") => {
                ("dividing by zero", &self.divisions)
            }
            Some(v) if remote_failure(v, "Cast error: ") => ("casting", &self.casts),
            Some(_) => return e,
            None if divides_by_zero(&e) => ("dividing by zero", &self.divisions),
            None if fails_to_cast(&e) => ("casting", &self.casts),
            None => return e,
        };
        if list.is_empty() {
            return e;
        }
        /// Named at most; more are counted.
        const NAMED: usize = 4;
        let mut named: Vec<String> = list.iter().take(NAMED).map(|d| format!("`{d}`")).collect();
        if list.len() > NAMED {
            named.push(format!("{} more", list.len() - NAMED));
        }
        let place = match list.len() {
            1 => format!("{what} in {}", named[0]),
            _ => format!("{what} in one of {}", named.join(", ")),
        };
        VolleyError::from(e).context(place).into()
    }
}

/// `e` with its columns of tables named by a path (`FROM 'dir/'`) unqualified: the
/// path, repeated before every column, would only hide the expression.
fn without_path_qualifiers(e: &Expr) -> Expr {
    e.clone()
        .transform(|x| match x {
            Expr::Column(c) if c.relation.as_ref().is_some_and(|r| r.table().contains('/')) => Ok(
                Transformed::yes(Expr::Column(Column::new_unqualified(c.name))),
            ),
            x => Ok(Transformed::no(x)),
        })
        .data()
        .unwrap_or_else(|_| e.clone())
}

/// Whether `e` is a constant other than zero or null: dividing by it cannot fail.
fn nonzero(e: &Expr) -> bool {
    match e {
        Expr::Literal(v, _) => {
            !v.is_null()
                && datafusion::common::ScalarValue::new_zero(&v.data_type()).is_ok_and(|z| z != *v)
        }
        _ => false,
    }
}

/// Whether `e` is a failure (`marker` in its text) in a task of this plan that ran on
/// a node: its error came back as text (`task ... failed on node-2: ... Divide by
/// zero error`), not as Arrow's error. One of a volley Dataset's steps read as a table
/// names its column itself (`computing column ...`).
fn remote_failure(e: &VolleyError, marker: &str) -> bool {
    let text = e.to_string();
    text.contains(" failed on ") && text.contains(marker) && !text.contains("computing column `")
}

/// Whether `e` is, or was caused by, Arrow's cast error.
fn fails_to_cast(e: &datafusion::error::DataFusionError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cause {
        if let Some(arrow::error::ArrowError::CastError(_)) = err.downcast_ref() {
            return true;
        }
        cause = err.source();
    }
    false
}

/// Whether `e` is, or was caused by, Arrow's division by zero (what the kernels of `/`
/// and `%` return), through its chain of contexts and external errors. A Parquet scan
/// that filters while decoding reports its filter's error as text (DataFusion's row
/// filter formats it into an Arrow `ComputeError`), so that text counts too.
fn divides_by_zero(e: &datafusion::error::DataFusionError) -> bool {
    use arrow::error::ArrowError;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cause {
        match err.downcast_ref() {
            Some(ArrowError::DivideByZero) => return true,
            Some(ArrowError::ComputeError(m)) if m.contains("ArrowError(DivideByZero") => {
                return true
            }
            _ => {}
        }
        cause = err.source();
    }
    false
}

/// Rows per batch, at least, in a plan that sorts rows whole ([`sorts_rows`]). A full
/// sort's cost beyond its comparisons is per batch: the runs it sorts are cut into
/// batches, and its merge builds each output batch from the current batches of every
/// run. At 32,768 rows rather than 8,192, sorting `lineitem` (TPC-H SF1) to Parquet
/// took 4.26 s against 5.12 s in one process (medians of 8, alternating), and 4.57 s
/// against 5.78 s on two one-CPU nodes (medians of 6; 4.90 against 5.13 s in an
/// earlier set): see `bench/results/`. Plans whose sorts order aggregated or joined
/// rows keep the configured size (TPC-H Q1 took ~15% longer with the larger batches
/// everywhere); the whole plan of a task gets the size, not the sort alone.
const SORT_BATCH_ROWS: usize = 32 * 1024;

/// The budget per CPU from which a plan that sorts rows whole gets larger batches:
/// each run the sort merges holds a batch or two in memory, so under a small budget
/// larger batches leave the merge no room (a sort of 6 M rows under 32 MiB failed),
/// or take the process far past its budget: sorting TPC-H `lineitem` at SF10 (60 M
/// rows) to Parquet under 1 GiB on 2 CPUs peaked at 2.4-3.1 GiB resident and spilled
/// 16-17 GiB with 32,768-row batches, against 1.65-1.96 GiB and 9.4 GiB with 8,192
/// (58-63 s against 63-68 s), so 512 MiB per CPU was too little.
const SORT_BATCH_MIN_BUDGET_PER_CPU: usize = 2 << 30;

/// Whether `ctx`'s memory budget is at least [`SORT_BATCH_MIN_BUDGET_PER_CPU`] per
/// partition of a plan's sorts (`partitions`).
fn roomy(ctx: &TaskContext, partitions: usize) -> bool {
    match ctx.memory_pool().memory_limit() {
        MemoryLimit::Finite(limit) => limit / partitions.max(1) >= SORT_BATCH_MIN_BUDGET_PER_CPU,
        MemoryLimit::Infinite => true,
        MemoryLimit::Unknown => false,
    }
}

/// Whether `plan` sorts rows whole: a sort with no limit whose input neither
/// aggregates nor joins (such a sort orders groups or joined rows, usually few).
fn sorts_rows(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let combines = |n: &Arc<dyn ExecutionPlan>| {
        let name = n.name();
        Ok(name.contains("Aggregate") || name.contains("Join"))
    };
    plan.exists(|n| {
        let sort = n
            .downcast_ref::<SortExec>()
            .is_some_and(|s| s.fetch().is_none())
            || n.downcast_ref::<GatherSortExec>().is_some();
        Ok(sort
            && !n
                .children()
                .into_iter()
                .any(|c| c.exists(combines).unwrap_or(true)))
    })
    .unwrap_or(false)
}

/// The most partitions any full sort of `plan` runs in (each partition sorts its
/// rows with its own share of the budget).
fn sort_partitions(plan: &Arc<dyn ExecutionPlan>) -> usize {
    let mut most = 1;
    let _ = plan.apply(|n| {
        if n.downcast_ref::<SortExec>()
            .is_some_and(|s| s.fetch().is_none())
        {
            most = most.max(n.properties().partitioning.partition_count());
        }
        if let Some(g) = n.downcast_ref::<GatherSortExec>() {
            most = most.max(g.input_partitions());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    most
}

/// `ctx` (its memory pool, spill folders and functions) with the settings of the
/// session the plan was made in, which a `SET datafusion.execution...` before the
/// query changed (the executor's own context holds the settings the volley context
/// started with), and batches of at least `rows` rows.
fn with_config(ctx: &Arc<TaskContext>, config: &SessionConfig, rows: usize) -> Arc<TaskContext> {
    let config = if config.batch_size() >= rows {
        config.clone()
    } else {
        config.clone().with_batch_size(rows)
    };
    Arc::new(TaskContext::new(
        ctx.task_id(),
        ctx.session_id(),
        config,
        ctx.scalar_functions().clone(),
        ctx.higher_order_functions().clone(),
        ctx.aggregate_functions().clone(),
        ctx.window_functions().clone(),
        ctx.runtime_env(),
    ))
}

/// A volley [`Dataset`] as a DataFusion table: scans run the dataset through the
/// volley executor and stream its batches into DataFusion.
#[derive(Debug)]
pub struct DatasetTable {
    dataset: Dataset,
    schema: SchemaRef,
}

impl DatasetTable {
    /// Wraps a dataset (its schema is computed now).
    pub fn try_new(dataset: Dataset) -> Result<Self> {
        let schema = dataset.schema()?;
        Ok(Self { dataset, schema })
    }
}

/// Column references without table qualifiers (DataFusion qualifies them with the
/// table's name; the dataset knows only column names).
fn unqualify(e: &Expr) -> datafusion::common::Result<Expr> {
    e.clone()
        .transform_up(|e| match e {
            Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::new_unqualified(
                c.name,
            )))),
            other => Ok(Transformed::no(other)),
        })
        .data()
}

#[async_trait::async_trait]
impl TableProvider for DatasetTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::common::Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let mut ds = self.dataset.clone();
        for f in filters {
            ds = ds.filter(unqualify(f)?)?;
        }
        let names: Vec<String> = match projection {
            Some(p) => p
                .iter()
                .map(|&i| self.schema.field(i).name().clone())
                .collect(),
            None => self
                .schema
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect(),
        };
        ds = ds.select(&names)?;
        if let Some(n) = limit {
            ds = ds.limit(n);
        }
        let schema = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => Arc::clone(&self.schema),
        };
        let partition = Arc::new(DatasetPartition {
            dataset: ds,
            schema: Arc::clone(&schema),
        });
        Ok(Arc::new(StreamingTableExec::try_new(
            schema,
            vec![partition],
            None,
            vec![],
            false,
            None,
        )?))
    }
}

/// Runs a dataset when DataFusion asks for its stream.
#[derive(Debug)]
struct DatasetPartition {
    dataset: Dataset,
    schema: SchemaRef,
}

impl PartitionStream for DatasetPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let dataset = self.dataset.clone();
        // The volley execution is synchronous; it runs on its own thread and hands
        // batches over. Dropping the stream closes the channel, which ends the thread,
        // which cancels the execution.
        let stream = thread_stream("volley-sql-scan", Arc::clone(&self.schema), move |tx| {
            for item in dataset.iter_batches()? {
                // DataFusion's operators count each batch's memory: view columns that
                // hold more than twice their rows' strings (a slice of a larger batch)
                // get buffers of their own, so that the count stays near the rows'.
                // Compact columns (an exchange's partitions, Flight pieces, decoded
                // files) pass as they are: copying them cost every string once more.
                if !tx.send(volley_common::compact_bloated_views(item?)?) {
                    break;
                }
            }
            Ok(())
        });
        stream.unwrap_or_else(|e| {
            Box::pin(RecordBatchStreamAdapter::new(
                Arc::clone(&self.schema),
                futures::stream::once(async move { Err(e) }),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::datasource::MemTable;

    /// The physical plan of `query` over a table `t(k, v)` of two partitions.
    fn planned(query: &str) -> Arc<dyn ExecutionPlan> {
        let batch = RecordBatch::try_from_iter([
            ("k", Arc::new(StringArray::from(vec!["a", "b"])) as _),
            ("v", Arc::new(Int64Array::from(vec![2, 1])) as _),
        ])
        .unwrap();
        let table =
            MemTable::try_new(batch.schema(), vec![vec![batch.clone()], vec![batch]]).unwrap();
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(table)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { ctx.sql(query).await?.create_physical_plan().await })
            .unwrap()
    }

    #[test]
    fn only_a_whole_sort_of_rows_gets_larger_batches() {
        assert!(sorts_rows(&planned("SELECT * FROM t ORDER BY v")));
        assert!(sorts_rows(&planned(
            "SELECT k, v * 2 AS w FROM t WHERE v > 0 ORDER BY k DESC"
        )));
        // A top-k keeps what it needs; sorted groups or joined rows are few.
        assert!(!sorts_rows(&planned("SELECT * FROM t ORDER BY v LIMIT 1")));
        assert!(!sorts_rows(&planned(
            "SELECT k, sum(v) FROM t GROUP BY k ORDER BY k"
        )));
        // Sorted below the join (which keeps its probe side's order): rows, sorted whole.
        assert!(sorts_rows(&planned(
            "SELECT a.k FROM t a JOIN t b ON a.k = b.k ORDER BY a.v"
        )));
        // Over what a join makes of both sides.
        assert!(!sorts_rows(&planned(
            "SELECT a.k FROM t a JOIN t b ON a.k = b.k ORDER BY a.v + b.v"
        )));
        assert!(!sorts_rows(&planned("SELECT k FROM t WHERE v > 1")));
    }

    /// On 2 CPUs a query runs in 3 partitions and ends in 2, one per read task that
    /// runs at once; a whole-row sort, and a plan that exchanges no rows, run in 2;
    /// partitions set in the options are kept.
    #[test]
    fn partitions_follow_the_cpus() {
        use volley_common::{RuntimeOptions, VolleyConfig};
        let dir = tempfile::tempdir().unwrap();
        // Three files: a scan of three partitions reads one each.
        for i in 0..3 {
            let batch = RecordBatch::try_from_iter([(
                "v",
                Arc::new(Int64Array::from_iter_values(i * 1000..(i + 1) * 1000)) as _,
            )])
            .unwrap();
            let file = std::fs::File::create(dir.path().join(format!("{i}.parquet"))).unwrap();
            let mut writer =
                datafusion::parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)
                    .unwrap();
            writer.write(&batch).unwrap();
            writer.close().unwrap();
        }
        let context = |partitions: Option<&str>| {
            let mut config = VolleyConfig::default();
            if let Some(n) = partitions {
                config.set("volley.exec.target_partitions", n).unwrap();
            }
            // A budget (a quarter of this) large enough for aggregations in
            // cache-sized tables.
            let runtime = volley_runtime::LocalRuntime::try_new(&RuntimeOptions {
                num_cpus: Some(2.0),
                memory: Some(16 << 30),
            })
            .unwrap();
            Context::with_runtime(config, runtime).unwrap()
        };
        let file = dir.path().to_str().unwrap();
        let explain = |ctx: &Context, query: &str| {
            let shown = ctx
                .sql_with_files(query, &[("t", file)])
                .unwrap()
                .explain()
                .unwrap();
            shown[shown.find("== physical plan ==").unwrap()..].to_string()
        };
        let grouped = "SELECT v % 7 AS k, count(*) AS n FROM t GROUP BY k";
        let ctx = context(None);
        let shown = explain(&ctx, grouped);
        // The final aggregation's 3 partitions, each folded from 16 finer ones.
        assert!(
            shown.contains("FoldPartitionsExec: 48 partitions into 3"),
            "{shown}"
        );
        assert!(shown.contains("Hash([t.v % Int64(7)@0], 48)"), "{shown}");
        assert!(shown.contains("RoundRobinBatch(2)"), "{shown}");
        let shown = explain(&ctx, "SELECT v FROM t ORDER BY v");
        assert!(!shown.contains(", 3)"), "{shown}");
        let shown = explain(&ctx, "SELECT v FROM t WHERE v > 10");
        assert!(shown.contains("file_groups={2 groups"), "{shown}");
        assert!(!shown.contains("RoundRobinBatch"), "{shown}");
        // As the options set them: 4 here, dealt into 2 where rows are exchanged.
        let ctx = context(Some("4"));
        let shown = explain(&ctx, grouped);
        assert!(
            shown.contains("FoldPartitionsExec: 64 partitions into 4"),
            "{shown}"
        );
        assert!(shown.contains("RoundRobinBatch(2)"), "{shown}");
        // The same rows in every case.
        let rows = |ctx: &Context| {
            ctx.sql_with_files(&format!("{grouped} ORDER BY k"), &[("t", file)])
                .unwrap()
                .collect_batch()
                .unwrap()
        };
        assert_eq!(rows(&context(None)), rows(&context(Some("1"))));
    }

    #[test]
    fn explained_queries_are_labelled_without_explain() {
        let label = |q: &str| explained_words(q.split_whitespace().collect()).join(" ");
        assert_eq!(label("EXPLAIN SELECT 1"), "SELECT 1");
        assert_eq!(
            label("explain analyze verbose SELECT x AS explain FROM t"),
            "SELECT x AS explain FROM t"
        );
        assert_eq!(label("EXPLAIN FORMAT indent SELECT 1;"), "SELECT 1;");
        assert_eq!(
            label("SET a = 1; EXPLAIN VERBOSE SELECT 2"),
            "SET a = 1; SELECT 2"
        );
        assert_eq!(label("SELECT 'explain'"), "SELECT 'explain'");
    }

    #[test]
    fn larger_batches_only_under_a_roomy_budget() {
        use datafusion::execution::memory_pool::GreedyMemoryPool;
        use datafusion::execution::runtime_env::RuntimeEnvBuilder;
        let with_pool = |bytes: usize| {
            let env = RuntimeEnvBuilder::new()
                .with_memory_pool(Arc::new(GreedyMemoryPool::new(bytes)))
                .build_arc()
                .unwrap();
            SessionContext::new_with_config_rt(Default::default(), env).task_ctx()
        };
        assert!(!roomy(&with_pool(32 << 20), 2));
        assert!(!roomy(&with_pool(SORT_BATCH_MIN_BUDGET_PER_CPU), 2));
        assert!(roomy(&with_pool(2 * SORT_BATCH_MIN_BUDGET_PER_CPU), 2));
        // By the partitions the plan's sorts run in.
        assert!(!roomy(&with_pool(2 * SORT_BATCH_MIN_BUDGET_PER_CPU), 3));
        assert!(roomy(&SessionContext::new().task_ctx(), 2));
    }

    #[test]
    fn larger_batches_keep_the_rest_of_the_context() {
        let session = SessionContext::new();
        let ctx = session.task_ctx();
        let config = ctx.session_config().clone();
        let larger = with_config(&ctx, &config, 4 * ctx.session_config().batch_size());
        assert_eq!(
            larger.session_config().batch_size(),
            4 * ctx.session_config().batch_size()
        );
        assert_eq!(larger.session_id(), ctx.session_id());
        assert_eq!(
            larger.scalar_functions().len(),
            ctx.scalar_functions().len()
        );
        assert!(Arc::ptr_eq(&larger.runtime_env(), &ctx.runtime_env()));
        // Never smaller than configured.
        let same = with_config(&ctx, &config, 1);
        assert_eq!(same.session_config().batch_size(), config.batch_size());
        // The plan's session's settings replace the executor's.
        let set = config.clone().with_batch_size(100);
        assert_eq!(
            with_config(&ctx, &set, 0).session_config().batch_size(),
            100
        );
        assert!(Arc::ptr_eq(
            &with_config(&ctx, &set, 0).runtime_env(),
            &ctx.runtime_env()
        ));
    }
}
