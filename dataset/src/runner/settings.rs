//! The settings a query changed (`SET`, `RESET`), carried by its tasks to the nodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::config::{ConfigField, ConfigOptions};
use datafusion::execution::context::SessionState;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::TaskContext;
use serde::{Deserialize, Serialize};
use volley_common::{Result, ResultExt};

/// The options of a query's session that differ from its context's: those a `SET` or
/// `RESET` before the query changed.
///
/// A node's task rebuilds the query's plan in the node's own session, whose functions
/// read its settings (`to_timestamp` takes `datafusion.execution.time_zone` when it is
/// made), and its operators read them as they run (rows per batch): a task rebuilds
/// and runs the plan in a session with what the query set over the node's options.
/// Only the changes travel: the node's other options follow its own memory budget (a
/// sort's spill reservation, a hash join's key density) and CPUs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SessionSettings(Vec<(String, Option<String>)>);

impl SessionSettings {
    /// The options of `session` whose values are not `base`'s (`None`: unset).
    pub(crate) fn changed(base: &ConfigOptions, session: &ConfigOptions) -> Self {
        let base: HashMap<String, Option<String>> = base
            .entries()
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect();
        Self(
            session
                .entries()
                .into_iter()
                .filter(|e| base.get(&e.key) != Some(&e.value))
                .map(|e| (e.key, e.value))
                .collect(),
        )
    }

    /// The task context of `state` with these settings (its functions that read a
    /// setting made again with them); `state`'s own where there are none.
    ///
    /// The last one made is kept: a query's tasks on a node carry the same settings,
    /// and making a session registers every function again (~0.4 ms, debug build).
    pub(crate) fn task_ctx(&self, state: &SessionState) -> Result<Arc<TaskContext>> {
        if self.0.is_empty() {
            return Ok(state.task_ctx());
        }
        type Made = Option<(String, SessionSettings, Arc<TaskContext>)>;
        static LAST: Mutex<Made> = Mutex::new(None);
        let session = state.session_id();
        if let Some((id, settings, made)) = &*LAST.lock().unwrap_or_else(PoisonError::into_inner) {
            if id == session && settings == self {
                return Ok(Arc::clone(made));
            }
        }
        let made = self.apply(state)?;
        *LAST.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((session.to_string(), self.clone(), Arc::clone(&made)));
        Ok(made)
    }

    fn apply(&self, state: &SessionState) -> Result<Arc<TaskContext>> {
        let mut config = state.config().clone();
        let options = config.options_mut();
        for (key, value) in &self.0 {
            match value {
                // Each option alone: `ConfigOptions::set` of the umbrella
                // `enable_dynamic_filter_pushdown` sets its three specific flags too,
                // which come before it and may differ.
                Some(value) => match key.strip_prefix("datafusion.") {
                    Some(field) => ConfigField::set(options, field, value),
                    None => options.set(key, value),
                },
                // Unset (an option with no value by default).
                None => options.reset(key),
            }
            .with_context(|| format!("applying the query's setting `{key}` on this node"))?;
        }
        let state = SessionStateBuilder::new_from_existing(state.clone())
            .with_config(config)
            .build();
        Ok(state.task_ctx())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::FunctionRegistry;
    use datafusion::prelude::SessionContext;

    #[test]
    fn only_the_changed_options_travel_and_remake_the_functions_that_read_them() {
        let base = SessionContext::new();
        let mut options = base.state().config_options().as_ref().clone();
        options.execution.time_zone = Some("+05:00".into());
        options
            .set("datafusion.execution.batch_size", "100")
            .unwrap();
        let settings = SessionSettings::changed(base.state().config_options(), &options);
        let mut keys: Vec<&str> = settings.0.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "datafusion.execution.batch_size",
                "datafusion.execution.time_zone"
            ]
        );
        assert_eq!(
            SessionSettings::changed(&options, &options),
            SessionSettings::default()
        );
        // A node's session: the time zone set, `to_timestamp` made again with it.
        let task = settings.task_ctx(&base.state()).unwrap();
        assert_eq!(task.session_config().batch_size(), 100);
        let f = task.udf("to_timestamp").unwrap();
        let rt = f.return_type(&[arrow::datatypes::DataType::Int64]).unwrap();
        assert_eq!(
            rt,
            arrow::datatypes::DataType::Timestamp(
                arrow::datatypes::TimeUnit::Nanosecond,
                Some("+05:00".into())
            )
        );
        // An option the query unset (`RESET`) is unset on a node that set it.
        let unset = SessionSettings::changed(&options, base.state().config_options());
        let mut node = base.state().config().clone();
        node.options_mut().execution.time_zone = Some("+01:00".into());
        let node = SessionStateBuilder::new().with_config(node).build();
        let task = unset.task_ctx(&node).unwrap();
        assert_eq!(task.session_config().options().execution.time_zone, None);
        // The umbrella dynamic-filter option off, the join's on: each as set.
        let mut options = base.state().config_options().as_ref().clone();
        options
            .set(
                "datafusion.optimizer.enable_dynamic_filter_pushdown",
                "false",
            )
            .unwrap();
        options
            .set(
                "datafusion.optimizer.enable_join_dynamic_filter_pushdown",
                "true",
            )
            .unwrap();
        let task = SessionSettings::changed(base.state().config_options(), &options)
            .task_ctx(&base.state())
            .unwrap();
        let optimizer = &task.session_config().options().optimizer;
        assert!(optimizer.enable_join_dynamic_filter_pushdown);
        assert!(!optimizer.enable_dynamic_filter_pushdown);
        assert!(!optimizer.enable_topk_dynamic_filter_pushdown);
        // An option this node does not know is named.
        let err = SessionSettings(vec![("datafusion.nothing".into(), Some("1".into()))])
            .task_ctx(&base.state())
            .unwrap_err();
        assert!(err.to_string().contains("`datafusion.nothing`"), "{err}");
    }
}
