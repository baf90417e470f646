//! Unit tests of the state machine: events in, commands out, no processes.

use std::time::Duration;

use super::tasks::TaskQueue;
use super::*;

type Commands = mpsc::UnboundedReceiver<NodeCommand>;

fn cpus(n: f64) -> Resources {
    Resources {
        num_cpus: n,
        ..Default::default()
    }
}

fn job(id: &str) -> JobEntry {
    let status = JobStatus {
        job_id: id.into(),
        name: String::new(),
        state: JobState::Pending,
        entrypoint: vec!["prog".into()],
        node_id: String::new(),
        exit_code: 0,
        error: String::new(),
        submitted_ms: 0,
        finished_ms: 0,
        task_retries: 0,
        waiting: String::new(),
    };
    // Attached: it runs at once, with no driver to place.
    JobEntry::new(status, HashMap::new(), true, Resources::default())
}

/// A head state with one running job `j` and one node `n1` of `cpus` CPUs, and
/// what the head sends that node.
fn one_node(cpus: f64) -> (State, Commands) {
    let mut s = State::default();
    s.add_job(job("j"));
    let (node, rx) = test_node(cpus, "a");
    s.nodes.insert("n1".into(), node);
    (s, rx)
}

fn test_node(n: f64, address: &str) -> (Node, Commands) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut node = Node::new(NodeRegistration {
        hostname: "h".into(),
        object_address: address.into(),
        total: cpus(n),
        ..Default::default()
    });
    node.link = Some(tx);
    (node, rx)
}

/// Registers and attaches a node through the events a node agent sends.
fn join(s: &mut State, n: f64, address: &str) -> (String, Commands) {
    let id = s.register_node(NodeRegistration {
        hostname: "h".into(),
        object_address: address.into(),
        total: cpus(n),
        ..Default::default()
    });
    let (tx, rx) = mpsc::unbounded_channel();
    s.attach(&id, tx).unwrap();
    (id, rx)
}

fn task(id: &str, args: &[&str]) -> TaskSpec {
    TaskSpec {
        job_id: "j".into(),
        task_id: id.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        arg_batches: vec![None; args.len()],
        resources: cpus(1.0),
        max_retries: 3,
        ..Default::default()
    }
}

fn submit(s: &mut State, id: &str) {
    s.submit(task(id, &[])).unwrap();
}

fn report(node: &str, id: &str, attempt: u32, bytes: u64, successor: &str) -> TaskReport {
    TaskReport {
        node_id: node.into(),
        task_id: id.into(),
        attempt,
        outcome: TaskOutcome::Succeeded {
            bytes,
            rows: 1,
            inline: Default::default(),
        },
        successor: (!successor.is_empty()).then(|| successor.to_string()),
        run_time: Default::default(),
    }
}

/// Attempt `attempt` of task `id` ended without running through (its worker died or
/// was killed), as node `node` reports it.
fn system_failure(node: &str, id: &str, attempt: u32, error: &str) -> TaskReport {
    TaskReport {
        outcome: TaskOutcome::SystemFailure {
            error: error.into(),
            unreadable: vec![],
        },
        ..report(node, id, attempt, 0, "")
    }
}

fn done(s: &mut State, id: &str, successor: &str) {
    assert!(s.task_reported(report("n1", id, 0, 0, successor)));
    s.schedule();
}

fn sent(rx: &mut Commands) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(c) = rx.try_recv() {
        out.push(match c {
            NodeCommand::RunTask(t) if t.ahead => format!("ahead {}", t.task_id),
            NodeCommand::RunTask(t) => format!("run {}", t.task_id),
            NodeCommand::PromoteTask(id) => format!("promote {id}"),
            NodeCommand::CancelTask(id) => format!("cancel {id}"),
            NodeCommand::StopJob(id) => format!("stop {id}"),
            NodeCommand::FreeObjects(ids) => format!("free {}", ids.join(",")),
            other => format!("{other:?}"),
        });
    }
    out
}

#[test]
fn tasks_wait_ahead_for_slots_that_end_and_inherit_or_get_them() {
    let (mut s, mut rx) = one_node(2.0);
    for id in ["t1", "t2", "t3", "t4", "t5", "t6", "t7"] {
        submit(&mut s, id);
    }
    s.schedule();
    // Two run, four wait ahead (two per running task of the same CPUs), one queues.
    assert_eq!(
        sent(&mut rx),
        ["run t1", "run t2", "ahead t3", "ahead t4", "ahead t5", "ahead t6"]
    );
    assert_eq!(s.nodes["n1"].available.num_cpus, 0.0);
    // t3 took over t1's slot on the node: nothing is freed, t7 goes ahead.
    done(&mut s, "t1", "t3");
    assert!(!s.tasks["t3"].ahead);
    assert_eq!(s.nodes["n1"].available.num_cpus, 0.0);
    assert_eq!(sent(&mut rx), ["ahead t7"]);
    // t2 ended with no successor: the head gives its slot to the oldest task ahead.
    done(&mut s, "t2", "");
    assert_eq!(sent(&mut rx), ["promote t4"]);
    assert_eq!(s.nodes["n1"].available.num_cpus, 0.0);
    for t in ["t3", "t4", "t5", "t6", "t7"] {
        done(&mut s, t, "");
    }
    assert_eq!(sent(&mut rx), ["promote t5", "promote t6", "promote t7"]);
    assert_eq!(s.nodes["n1"].available.num_cpus, 2.0);
    assert!(s.nodes["n1"].ahead.is_empty());
    assert_eq!(s.nodes["n1"].slots.values().sum::<usize>(), 0);
}

#[test]
fn short_tasks_wait_ahead_deeper_than_long_ones() {
    assert_eq!(tasks::ahead_per_slot(None), 2);
    assert_eq!(tasks::ahead_per_slot(Some(2.0)), 2);
    assert_eq!(tasks::ahead_per_slot(Some(0.02)), 2);
    assert_eq!(tasks::ahead_per_slot(Some(0.004)), 10);
    assert_eq!(tasks::ahead_per_slot(Some(1e-6)), 128);
    // A job whose tasks took 4 ms in their workers: ten wait ahead per slot.
    let (mut s, mut rx) = one_node(1.0);
    for i in 0..20 {
        submit(&mut s, &format!("t{i}"));
    }
    s.schedule();
    assert_eq!(sent(&mut rx).len(), 3, "one runs, two wait ahead at first");
    let mut r = report("n1", "t0", 0, 0, "t1");
    r.run_time = std::time::Duration::from_millis(4);
    assert!(s.task_reported(r));
    s.schedule();
    assert_eq!(s.nodes["n1"].ahead.len(), 10);
    assert_eq!(sent(&mut rx).len(), 9);
    // Tasks of another name (another stage of the job) are timed apart: two of them
    // wait ahead until their own times are known.
    let (mut s, mut rx) = one_node(1.0);
    let mut r = report("n1", "t0", 0, 0, "");
    r.run_time = std::time::Duration::from_millis(1);
    submit(&mut s, "t0");
    s.schedule();
    assert!(s.task_reported(r));
    for i in 1..10 {
        let mut t = task(&format!("r{i}"), &[]);
        t.name = "reduce".into();
        s.submit(t).unwrap();
    }
    s.schedule();
    assert_eq!(
        sent(&mut rx).len(),
        4,
        "t0, then one reduce task runs and two wait"
    );
}

#[test]
fn nothing_goes_ahead_while_an_actor_waits_for_room() {
    let (mut s, mut rx) = one_node(1.0);
    submit(&mut s, "t1");
    s.schedule();
    assert_eq!(sent(&mut rx), ["run t1"]);
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "a".into(),
        resources: cpus(1.0),
        ..Default::default()
    })
    .unwrap();
    submit(&mut s, "t2");
    s.schedule();
    assert!(sent(&mut rx).is_empty(), "t2 waits at the head");
    assert!(matches!(s.tasks["t2"].state, TaskState::Pending));
}

#[test]
fn tasks_go_to_the_node_whose_object_store_has_room() {
    let (mut s, mut rx1) = one_node(4.0);
    let (n2, mut rx2) = test_node(2.0, "b");
    s.nodes.insert("n2".into(), n2);
    for n in s.nodes.values_mut() {
        n.object_store_memory = 100;
    }
    // n1 has more CPUs free, but its store is half full: t1 goes to n2.
    s.nodes.get_mut("n1").unwrap().stored = 50;
    submit(&mut s, "t1");
    s.schedule();
    assert!(sent(&mut rx1).is_empty());
    assert_eq!(sent(&mut rx2), ["run t1"]);
    // Its output is counted on n2 as soon as it is reported...
    assert!(s.task_reported(report("n2", "t1", 0, 80, "")));
    assert_eq!(s.nodes["n2"].stored, 80);
    // ...so the next goes back to n1, now the emptier store.
    submit(&mut s, "t2");
    s.schedule();
    assert_eq!(sent(&mut rx1), ["run t2"]);
    // Freeing t1's object takes its bytes off n2.
    s.free(&["t1".to_string()]);
    assert_eq!(s.nodes["n2"].stored, 0);
}

/// A report its node sends again (the answer to the first was lost) is accepted and
/// changes nothing: the attempt stands, its object stays.
#[test]
fn a_report_sent_again_is_accepted_once() {
    let (mut s, mut rx) = one_node(2.0);
    submit(&mut s, "t1");
    s.schedule();
    assert_eq!(sent(&mut rx), ["run t1"]);
    assert!(s.task_reported(report("n1", "t1", 0, 80, "")));
    assert!(s.task_reported(report("n1", "t1", 0, 80, "")));
    assert_eq!(s.nodes["n1"].stored, 80);
    assert!(sent(&mut rx).is_empty(), "nothing freed or run again");
    // Another attempt's report, or another node's, is still stale.
    assert!(!s.task_reported(report("n1", "t1", 1, 80, "")));
    assert!(!s.task_reported(report("n2", "t1", 0, 80, "")));
}

/// Tasks placed one at a time on idle nodes of equal CPUs and stores within the same
/// quarter go to the node storing the fewest bytes: each output lands on another node.
#[test]
fn tasks_placed_one_at_a_time_spread_by_stored_bytes() {
    let (mut s, mut rx1) = one_node(2.0);
    let (n2, mut rx2) = test_node(2.0, "b");
    s.nodes.insert("n2".into(), n2);
    for n in s.nodes.values_mut() {
        n.object_store_memory = 1000;
    }
    submit(&mut s, "t1");
    s.schedule();
    let (first, other) = match (sent(&mut rx1).as_slice(), sent(&mut rx2).as_slice()) {
        ([run], []) if run == "run t1" => ("n1", "n2"),
        ([], [run]) if run == "run t1" => ("n2", "n1"),
        other => panic!("t1 went nowhere or twice: {other:?}"),
    };
    assert!(s.task_reported(report(first, "t1", 0, 10, "")));
    s.schedule();
    submit(&mut s, "t2");
    s.schedule();
    let (on_first, on_other) = match first {
        "n1" => (sent(&mut rx1), sent(&mut rx2)),
        _ => (sent(&mut rx2), sent(&mut rx1)),
    };
    assert!(on_first.is_empty(), "{on_first:?}");
    assert_eq!(on_other, ["run t2"], "t2 goes to {other}");
}

/// Task `id`, pending, has had all its inputs for `STARVING_AFTER` and more, and
/// work placed after it passed it over.
fn starving(s: &mut State, id: &str) {
    let t = s.tasks.get_mut(id).unwrap();
    assert!(t.ready_since.is_some(), "{id} was tried");
    t.ready_since = Some(Instant::now() - STARVING_AFTER - Duration::from_millis(1));
    t.passed_over = true;
}

/// One node of 2 CPUs running `s1` and `s2`, and `big` (2 CPUs) waiting, tried once.
fn big_behind_two_running() -> (State, Commands) {
    let (mut s, mut rx) = one_node(2.0);
    submit(&mut s, "s1");
    submit(&mut s, "s2");
    s.schedule();
    assert_eq!(sent(&mut rx), ["run s1", "run s2"]);
    s.submit(TaskSpec {
        resources: cpus(2.0),
        ..task("big", &[])
    })
    .unwrap();
    s.schedule();
    (s, rx)
}

#[test]
fn a_big_request_passed_over_long_enough_holds_a_node_until_it_fits() {
    let (mut s, mut rx) = big_behind_two_running();
    assert!(sent(&mut rx).is_empty());
    // Not yet waiting long: smaller tasks take what frees, as they come.
    submit(&mut s, "s3");
    done(&mut s, "s1", "");
    assert_eq!(sent(&mut rx), ["run s3"]);
    assert!(s.tasks["big"].passed_over, "s3 went past it");
    starving(&mut s, "big");
    s.schedule();
    assert_eq!(s.holds.get("big").map(String::as_str), Some("n1"));
    // Now nothing else goes there, not even ahead of room.
    submit(&mut s, "s4");
    submit(&mut s, "s5");
    s.schedule();
    assert!(sent(&mut rx).is_empty());
    done(&mut s, "s2", "");
    assert!(
        sent(&mut rx).is_empty(),
        "one CPU free: big waits, and s4 with it"
    );
    // Nor does an actor take what frees (actors are placed before tasks in a pass).
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "a1".into(),
        resources: cpus(1.0),
        ..Default::default()
    })
    .unwrap();
    s.schedule();
    assert!(sent(&mut rx).is_empty());
    done(&mut s, "s3", "");
    assert_eq!(sent(&mut rx), ["run big"]);
    s.kill_actor("a1", "not needed");
    s.schedule();
    assert!(s.holds.is_empty());
    done(&mut s, "big", "");
    assert_eq!(sent(&mut rx), ["run s4", "run s5"]);
}

#[test]
fn a_held_node_leaves_the_others_working_and_a_hold_that_cannot_be_met_moves() {
    let (mut s, mut rx1) = one_node(2.0);
    let (n2, mut rx2) = test_node(2.0, "b");
    s.nodes.insert("n2".into(), n2);
    for id in ["s1", "s2", "s3", "s4"] {
        submit(&mut s, id);
    }
    s.schedule();
    assert_eq!(sent(&mut rx1).len() + sent(&mut rx2).len(), 4);
    s.submit(TaskSpec {
        resources: cpus(2.0),
        ..task("big", &[])
    })
    .unwrap();
    s.schedule();
    starving(&mut s, "big");
    s.schedule();
    let held = s.holds["big"].clone();
    let other = if held == "n1" { "n2" } else { "n1" };
    // The other node goes on taking small tasks.
    submit(&mut s, "s5");
    let on_other: Vec<String> = s.nodes[other].running.iter().cloned().collect();
    let report_node = |t: &str| report(other, t, 0, 0, "");
    assert!(s.task_reported(report_node(&on_other[0])));
    s.schedule();
    assert!(s.nodes[other].running.contains("s5"), "s5 went to {other}");
    assert!(!s.nodes[&held].running.contains("s5"));
    // An actor takes the held node's room for good: the hold moves to the other node,
    // which could hold the task once its tasks end.
    let n = s.nodes.get_mut(&held).unwrap();
    let running: Vec<String> = n.running.iter().cloned().collect();
    for t in &running {
        s.tasks.get_mut(t).unwrap().spec.actor = Some("a".into());
    }
    s.schedule();
    assert_eq!(s.holds.get("big").map(String::as_str), Some(other));
    let _ = (sent(&mut rx1), sent(&mut rx2));
}

#[test]
fn a_task_that_waits_its_turn_among_its_size_holds_no_node() {
    let (mut s, mut rx) = one_node(1.0);
    for i in 0..8 {
        submit(&mut s, &format!("s{i}"));
    }
    s.schedule();
    sent(&mut rx);
    let waiting: Vec<String> = s.queue.cpu.iter().map(|(id, _)| id.clone()).collect();
    assert!(!waiting.is_empty());
    for id in &waiting {
        let t = s.tasks.get_mut(id).unwrap();
        t.ready_since = Some(Instant::now() - STARVING_AFTER * 2);
    }
    s.schedule();
    assert!(s.holds.is_empty(), "nothing passed them over");
}

#[test]
fn a_smaller_task_ahead_of_a_holder_in_the_queue_does_not_block_it() {
    let (mut s, mut rx) = big_behind_two_running();
    starving(&mut s, "big");
    s.schedule();
    assert_eq!(s.holds.get("big").map(String::as_str), Some("n1"));
    // s1's worker dies: its retry goes to the front of the queue, ahead of big.
    assert!(s.task_reported(system_failure("n1", "s1", 0, "worker died")));
    s.schedule();
    assert!(sent(&mut rx).is_empty(), "the retry waits behind the hold");
    done(&mut s, "s2", "");
    assert_eq!(sent(&mut rx), ["run big"]);
    assert!(s.holds.is_empty());
    done(&mut s, "big", "");
    assert_eq!(sent(&mut rx), ["run s1"]);
}

#[test]
fn a_task_waiting_for_a_gpu_holds_its_node_only_from_gpu_work() {
    let mut s = State::default();
    s.add_job(job("j"));
    let mut rx = join_gpu_node(&mut s, cpus(4.0).with_gpus(1.0));
    let node = s.nodes.keys().next().unwrap().clone();
    let gpu_task = |id: &str| TaskSpec {
        resources: cpus(1.0).with_gpus(1.0),
        ..task(id, &[])
    };
    s.submit(gpu_task("g1")).unwrap();
    s.submit(gpu_task("g2")).unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx), ["run g1"]);
    starving(&mut s, "g2");
    s.schedule();
    assert_eq!(s.holds.get("g2"), Some(&node));
    // CPU tasks still run beside it; another GPU task does not go past it.
    submit(&mut s, "c1");
    s.submit(TaskSpec {
        resources: cpus(0.5).with_gpus(0.5),
        ..task("g3", &[])
    })
    .unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx), ["run c1"]);
    s.task_reported(report(&node, "g1", 0, 0, ""));
    s.schedule();
    assert_eq!(sent(&mut rx), ["run g2"]);
}

#[test]
fn a_hold_its_node_cannot_meet_is_not_taken() {
    let mut s = State::default();
    s.add_job(job("j"));
    let id = s.register_node(NodeRegistration {
        hostname: "h".into(),
        object_address: "g".into(),
        total: cpus(4.0).with_gpus(2.0),
        gpu_ids: vec![0, 1],
        ..Default::default()
    });
    let (tx, _rx) = mpsc::unbounded_channel();
    s.attach(&id, tx).unwrap();
    // Half of each GPU is held for good (as by two actors): one GPU's worth is
    // free in all, but no whole GPU will be.
    let n = s.nodes.get_mut(&id).unwrap();
    n.gpus.hold(&[0], 0.5);
    n.gpus.hold(&[1], 0.5);
    n.available.num_gpus -= 1.0;
    s.submit(TaskSpec {
        resources: cpus(1.0).with_gpus(1.0),
        ..task("g1", &[])
    })
    .unwrap();
    s.schedule();
    starving(&mut s, "g1");
    s.schedule();
    assert!(s.holds.is_empty(), "{:?}", s.holds);
}

#[test]
fn a_holder_that_loses_an_input_lets_its_node_go() {
    let (mut s, mut rx1) = one_node(2.0);
    let (n2, mut rx2) = test_node(2.0, "b");
    s.nodes.insert("n2".into(), n2);
    submit(&mut s, "t0");
    s.schedule();
    let on = if sent(&mut rx1).is_empty() {
        "n2"
    } else {
        "n1"
    };
    sent(&mut rx2);
    assert!(s.task_reported(report(on, "t0", 0, 10, "")));
    for id in ["s1", "s2", "s3", "s4"] {
        submit(&mut s, id);
    }
    s.submit(TaskSpec {
        resources: cpus(2.0),
        ..task("big", &["t0"])
    })
    .unwrap();
    s.schedule();
    starving(&mut s, "big");
    s.schedule();
    assert!(s.holds.contains_key("big"));
    s.node_died(on);
    s.schedule();
    assert!(!s.holds.contains_key("big"), "{:?}", s.holds);
    assert!(!s.tasks["big"].passed_over);
}

#[test]
fn a_draining_node_gets_no_work_and_its_objects_are_copied_before_it_leaves() {
    let (mut s, mut rx1) = one_node(4.0);
    let (n2, mut rx2) = test_node(1.0, "b");
    s.nodes.insert("n2".into(), n2);
    // t1 runs on n1 (more CPUs) and its output stays there.
    submit(&mut s, "t1");
    s.schedule();
    assert_eq!(sent(&mut rx1), ["run t1"]);
    assert!(s.task_reported(report("n1", "t1", 0, 80, "")));
    // Draining n1: new work goes to n2 though n1 has more room, and t1's output
    // is copied to n2.
    let st = s.drain("n1").unwrap();
    assert_eq!((st.running_tasks, st.objects_to_copy), (0, 1));
    assert_eq!(
        rx2.try_recv().ok(),
        Some(NodeCommand::CopyObject {
            object_id: "t1".into(),
            from: "a".into()
        })
    );
    // Asking again sends no second copy while the first is on its way.
    s.drain("n1");
    assert!(sent(&mut rx2).is_empty());
    submit(&mut s, "t2");
    s.schedule();
    assert!(sent(&mut rx1).is_empty());
    assert_eq!(sent(&mut rx2), ["run t2"]);
    s.object_copied("t1", "n2", 80, "");
    assert_eq!(s.objects["t1"].locations, ["n1", "n2"]);
    assert_eq!(s.drain("n1").unwrap().objects_to_copy, 0);
    // Leaving: nothing is rebuilt (n2 has the copy), and the node is listed as gone
    // after draining, not dead.
    s.leave("n1");
    assert_eq!(s.objects["t1"].locations, ["n2"]);
    assert_eq!(s.tasks["t1"].state, TaskState::Done);
    assert!(
        !s.nodes.contains_key("n1"),
        "a scheduling pass no longer sees it"
    );
    assert!(!s.gone_nodes["n1"].alive && s.gone_nodes["n1"].draining);
    let listed = s.status().nodes;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].node_id, "n1");
    assert_eq!(listed[0].state, NodeState::Left);
    assert!(s.drain("n1").is_none());
}

#[test]
fn a_drain_copy_of_an_object_freed_meanwhile_gives_back_its_reservation() {
    for end in ["freed", "job ended"] {
        let (mut s, mut rx1) = one_node(4.0);
        let (n2, mut rx2) = test_node(1.0, "b");
        s.nodes.insert("n2".into(), n2);
        submit(&mut s, "t1");
        s.schedule();
        assert_eq!(sent(&mut rx1), ["run t1"]);
        assert!(s.task_reported(report("n1", "t1", 0, 80, "")));
        let before = s.nodes["n2"].stored;
        assert_eq!(s.drain("n1").unwrap().objects_to_copy, 1);
        assert_eq!(
            s.nodes["n2"].stored,
            before + 80,
            "{end}: reserved for the copy"
        );
        assert!(matches!(rx2.try_recv(), Ok(NodeCommand::CopyObject { .. })));
        match end {
            "freed" => s.free(&["t1".to_string()]),
            _ => s.finish_job("j", JobState::Stopped, -1, "stopped"),
        }
        assert!(!s.objects.contains_key("t1"), "{end}");
        s.object_copied("t1", "n2", 80, "");
        assert_eq!(
            s.nodes["n2"].stored, before,
            "{end}: the reservation is given back"
        );
        let freed = sent(&mut rx2);
        assert!(freed.contains(&"free t1".to_string()), "{end}: {freed:?}");
    }
}

#[test]
fn a_task_that_reads_nothing_waits_for_a_store_with_room() {
    let (mut s, mut rx1) = one_node(4.0);
    let (n2, mut rx2) = test_node(1.0, "b");
    s.nodes.insert("n2".into(), n2);
    for n in s.nodes.values_mut() {
        n.object_store_memory = 100;
    }
    // n1 has every CPU free, but its store is three quarters full.
    s.nodes.get_mut("n1").unwrap().stored = 80;
    submit(&mut s, "t0");
    submit(&mut s, "t1");
    s.schedule();
    assert!(sent(&mut rx1).is_empty());
    assert_eq!(sent(&mut rx2), ["run t0", "ahead t1"]);
    // One that waited long enough goes where it fits.
    submit(&mut s, "t2");
    s.tasks.get_mut("t2").unwrap().pending_since -= SOURCE_WAIT;
    s.schedule();
    assert_eq!(sent(&mut rx1), ["run t2"]);
    // And when no store has room, none waits.
    s.nodes.get_mut("n2").unwrap().stored = 90;
    submit(&mut s, "t3");
    s.schedule();
    assert_eq!(sent(&mut rx1), ["run t3"]);
    assert!(sent(&mut rx2).is_empty());
}

#[test]
fn the_queue_keeps_order_and_a_lower_bound_on_cpu_requests() {
    let mut q = TaskQueue::default();
    q.push("a".into(), Some(2.0), false);
    q.push("b".into(), Some(1.0), false);
    q.push("retry".into(), Some(4.0), true);
    q.push("gpu".into(), None, false);
    let ids: Vec<&str> = q.cpu.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["retry", "a", "b"]);
    assert_eq!(q.other, ["gpu"]);
    assert_eq!(q.cpu_min, 1.0);
    q.retain(|id| id != "b" && id != "retry" && id != "a");
    assert!(q.cpu.is_empty());
    // The bound restarts once the CPU queue emptied.
    q.push("c".into(), Some(3.0), false);
    assert_eq!(q.cpu_min, 3.0);
    assert_eq!(q.other, ["gpu"]);
}

/// Where each bundle of a group of `bundles` one-CPU bundles goes with `strategy` on
/// nodes of `cpus` CPUs each (None: not placed).
fn place(strategy: Strategy, nodes: &[f64], bundles: usize) -> Option<Vec<String>> {
    let mut s = State::default();
    s.add_job(job("j"));
    let mut links = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        links.push(join(&mut s, *n, &format!("addr{i}")));
    }
    s.create_group("j", "g", strategy, vec![cpus(1.0); bundles])
        .unwrap();
    s.schedule();
    let status = s.group_status("g").unwrap();
    status.ready.then(|| {
        status
            .bundle_nodes
            .into_iter()
            .map(Option::unwrap)
            .collect()
    })
}

#[test]
fn placement_strategies_pack_spread_or_wait() {
    // PACK fills one node first; SPREAD uses as many nodes as it can.
    assert_eq!(
        place(Strategy::Pack, &[4.0, 4.0], 3).unwrap(),
        ["node-1", "node-1", "node-1"]
    );
    let spread = place(Strategy::Spread, &[4.0, 4.0], 3).unwrap();
    assert_eq!(spread.iter().filter(|n| *n == "node-1").count(), 2);
    assert_eq!(spread.iter().filter(|n| *n == "node-2").count(), 1);
    // PACK goes on to another node when one is full.
    assert_eq!(
        place(Strategy::Pack, &[2.0, 2.0], 3).unwrap(),
        ["node-1", "node-1", "node-2"]
    );
    // STRICT_PACK: one node or nothing; STRICT_SPREAD: a node each or nothing.
    assert_eq!(
        place(Strategy::StrictPack, &[2.0, 4.0], 3).unwrap(),
        ["node-2", "node-2", "node-2"]
    );
    assert!(place(Strategy::StrictPack, &[2.0, 2.0], 3).is_none());
    assert_eq!(
        place(Strategy::StrictSpread, &[1.0, 1.0, 1.0], 3).unwrap(),
        ["node-1", "node-2", "node-3"]
    );
    assert!(place(Strategy::StrictSpread, &[4.0, 4.0], 3).is_none());
}

#[test]
fn a_group_holds_its_room_and_is_placed_again_when_its_node_dies() {
    let mut s = State::default();
    s.add_job(job("j"));
    let (n1, _rx1) = join(&mut s, 2.0, "a");
    s.create_group("j", "g", Strategy::StrictPack, vec![cpus(1.0), cpus(1.0)])
        .unwrap();
    s.schedule();
    assert_eq!(s.nodes[&n1].available.num_cpus, 0.0, "reserved");
    // A task of the group runs in its bundle, not on the node's own room.
    let mut t = task("t1", &[]);
    t.bundle = Some(BundleChoice {
        group: "g".into(),
        index: Some(1),
    });
    s.submit(t).unwrap();
    s.schedule();
    assert!(matches!(&s.tasks["t1"].state, TaskState::Running { node, .. } if *node == n1));
    // Its node dies: the group waits for room again, then is placed on the new node.
    s.node_died(&n1);
    assert!(!s.group_status("g").unwrap().ready);
    assert_eq!(s.tasks["t1"].state, TaskState::Pending);
    let (n2, mut rx2) = join(&mut s, 2.0, "b");
    s.schedule();
    assert_eq!(
        s.group_status("g").unwrap().bundle_nodes,
        [Some(n2.clone()), Some(n2.clone())]
    );
    assert_eq!(sent(&mut rx2), ["run t1"]);
    // Removing it gives its room back.
    assert!(s.task_reported(report(&n2, "t1", 1, 0, "")));
    s.remove_group("g");
    assert_eq!(s.nodes[&n2].available.num_cpus, 2.0);
}

#[test]
fn a_dead_node_s_tasks_are_retried_and_its_objects_rebuilt_from_lineage() {
    let mut s = State::default();
    s.add_job(job("j"));
    let (n1, mut rx1) = join(&mut s, 1.0, "a");
    // m1 (a map task) runs on n1; its output is read by r1.
    s.submit(task("m1", &[])).unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx1), ["run m1"]);
    assert!(s.task_reported(report(&n1, "m1", 0, 10, "")));
    s.submit(task("r1", &["m1"])).unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx1), ["run r1"]);
    // n1 misses its heartbeats: r1 is retried, m1's output (only there) is rebuilt.
    s.nodes.get_mut(&n1).unwrap().last_seen -= Duration::from_secs(10);
    s.check_heartbeats(Duration::from_secs(5));
    assert!(!s.nodes.contains_key(&n1) && !s.gone_nodes[&n1].alive);
    assert!(s
        .status()
        .nodes
        .iter()
        .any(|n| n.node_id == n1 && n.state == NodeState::Dead));
    assert_eq!(s.tasks["m1"].state, TaskState::Pending);
    assert_eq!(s.tasks["m1"].reconstructions, 1);
    assert_eq!((s.tasks["r1"].attempt, s.tasks["r1"].retries_left), (1, 2));
    assert_eq!(s.jobs["j"].status.task_retries, 2);
    let (n2, mut rx2) = join(&mut s, 1.0, "b");
    s.schedule();
    // m1 runs first; r1 waits for its input to be back.
    assert_eq!(sent(&mut rx2), ["run m1"]);
    // A late report from the dead node's attempt is stale and changes nothing.
    assert!(!s.task_reported(report(&n1, "m1", 0, 10, "")));
    assert!(s.task_reported(report(&n2, "m1", 1, 10, "")));
    s.schedule();
    assert_eq!(sent(&mut rx2), ["run r1"]);
    assert_eq!(s.objects["m1"].locations, std::slice::from_ref(&n2));
    assert!(s.object_settled("m1"));
    // The reduce task reads only the copy on the live node.
    assert_eq!(s.object_status("m1").location.unwrap().addresses, ["b"]);
}

#[test]
fn a_task_fails_for_good_once_its_retries_are_used() {
    let (mut s, mut rx) = one_node(1.0);
    let mut t = task("t1", &[]);
    t.max_retries = 1;
    s.submit(t).unwrap();
    for attempt in 0..2 {
        s.schedule();
        assert_eq!(sent(&mut rx), ["run t1"]);
        assert!(s.task_reported(system_failure("n1", "t1", attempt, "worker died")));
    }
    assert_eq!(s.tasks["t1"].state, TaskState::Failed);
    let e = s.object_status("t1").error.unwrap();
    assert!(e.message.contains("worker died (no retries left)"), "{e:?}");
    // Its node's room is back.
    assert_eq!(s.nodes["n1"].available.num_cpus, 1.0);
}

/// A node whose workers of a job cannot start hands the job's tasks back: their
/// retries go to the other nodes, and once no node is left that could start one, the
/// task fails at once with every node's reason.
#[test]
fn a_node_that_cannot_start_a_jobs_workers_gets_none_of_its_tasks() {
    let mut s = State::default();
    s.add_job(job("j"));
    let (n1, rx1) = join(&mut s, 1.0, "a");
    let (n2, rx2) = join(&mut s, 1.0, "b");
    let no_worker = |node: &str, task: &str, attempt| TaskReport {
        node_id: node.into(),
        task_id: task.into(),
        attempt,
        outcome: TaskOutcome::NoWorker {
            error: format!("cannot start a worker on {node}: it exited"),
        },
        successor: None,
        run_time: Default::default(),
    };
    submit(&mut s, "t1");
    s.schedule();
    let mut rx = HashMap::from([(n1.clone(), rx1), (n2.clone(), rx2)]);
    let (first, second) = if sent(rx.get_mut(&n1).unwrap()) == ["run t1"] {
        (n1.clone(), n2.clone())
    } else {
        (n2.clone(), n1.clone())
    };
    assert!(s.task_reported(no_worker(&first, "t1", 0)));
    s.schedule();
    // Its retry goes to the other node, though the first has room again.
    assert_eq!(sent(rx.get_mut(&second).unwrap()), ["run t1"]);
    assert_eq!(s.nodes[&first].available.num_cpus, 1.0);
    // Another task of the job keeps off the first node too: it waits ahead on the
    // second.
    submit(&mut s, "t2");
    s.schedule();
    assert_eq!(sent(rx.get_mut(&first).unwrap()), Vec::<String>::new());
    assert_eq!(sent(rx.get_mut(&second).unwrap()), ["ahead t2"]);
    // The second node cannot start them either: it hands both back.
    assert!(s.task_reported(no_worker(&second, "t1", 1)));
    assert!(s.task_reported(no_worker(&second, "t2", 0)));
    s.schedule();
    // The job's tasks with GPUs are not kept off either node (a node starts workers
    // with GPUs apart).
    assert!(s.nodes_without_workers("j", true).is_empty());
    assert_eq!(s.nodes_without_workers("j", false).len(), 2);
    // No node is left that could start the job's workers: both fail now, saying why
    // (no retry was used).
    for t in ["t1", "t2"] {
        assert_eq!(s.tasks[t].state, TaskState::Failed, "{t}");
        assert_eq!(s.tasks[t].retries_left, 3, "{t}");
        let e = s.object_status(t).error.unwrap().message;
        assert!(e.contains("no node can start its job's workers"), "{e}");
        assert!(
            e.contains(&format!("cannot start a worker on {first}: it exited"))
                && e.contains(&format!("cannot start a worker on {second}: it exited")),
            "{e}"
        );
    }
    // Another job's tasks still go to both nodes.
    let mut other = job("k");
    other.status.job_id = "k".into();
    s.add_job(other);
    for id in ["k1", "k2"] {
        let mut t = task(id, &[]);
        t.job_id = "k".into();
        s.submit(t).unwrap();
    }
    s.schedule();
    for node in [&first, &second] {
        let cmds = sent(rx.get_mut(node).unwrap());
        assert!(
            cmds.iter()
                .any(|c| c.ends_with(" k1") || c.ends_with(" k2")),
            "{node}: {cmds:?}"
        );
    }
}

#[test]
fn a_job_s_end_takes_its_tasks_actors_groups_and_objects_with_it() {
    let (mut s, mut rx) = one_node(4.0);
    submit(&mut s, "t1");
    submit(&mut s, "t2");
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "a1".into(),
        resources: cpus(1.0),
        ..Default::default()
    })
    .unwrap();
    s.create_group("j", "g", Strategy::Pack, vec![cpus(1.0)])
        .unwrap();
    s.schedule();
    assert!(matches!(
        s.actor("a1").unwrap().state,
        ActorState::Starting { .. }
    ));
    assert!(s.group_status("g").unwrap().ready);
    done(&mut s, "t1", "");
    sent(&mut rx);
    s.finish_job("j", JobState::Stopped, -1, "stopped by request");
    let j = s.job("j").unwrap();
    assert_eq!(j.status.state, JobState::Stopped);
    assert!(j.status.finished_ms > 0);
    assert!(s.tasks.is_empty() && s.objects.is_empty() && s.groups.is_empty());
    assert!(matches!(s.actor("a1").unwrap().state, ActorState::Dead(_)));
    assert_eq!(s.nodes["n1"].available.num_cpus, 4.0, "all room given back");
    let cmds = sent(&mut rx);
    assert!(cmds.contains(&"StopActor(\"a1\")".to_string()), "{cmds:?}");
    assert_eq!(cmds.last().map(String::as_str), Some("stop j"));
    // A finished job takes no more work and does not end twice.
    let e = s.submit(task("t3", &[])).unwrap_err().to_string();
    assert!(e.contains("job j is not running"), "{e}");
    s.finish_job("j", JobState::Failed, 1, "late");
    assert_eq!(s.job("j").unwrap().status.state, JobState::Stopped);
}

/// An actor stopped while its call runs (by request, or with its group): the call
/// fails at once, saying why, instead of waiting for a report its node never sends.
#[test]
fn a_stopped_actors_running_call_fails() {
    let (mut s, mut rx) = one_node(2.0);
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "a1".into(),
        resources: cpus(1.0),
        ..Default::default()
    })
    .unwrap();
    s.schedule();
    let incarnation = s.actors["a1"].incarnation;
    s.actor_reported("a1", "n1", incarnation, true, 42, "");
    assert!(matches!(s.actors["a1"].state, ActorState::Alive { .. }));
    s.submit(TaskSpec {
        actor: Some("a1".into()),
        resources: cpus(0.0),
        ..task("c1", &[])
    })
    .unwrap();
    s.schedule();
    sent(&mut rx);
    assert!(
        matches!(s.tasks["c1"].state, TaskState::Running { .. }),
        "{:?}",
        s.tasks["c1"].state
    );
    s.kill_actor("a1", "stopped by request");
    assert_eq!(s.tasks["c1"].state, TaskState::Failed);
    let e = s.object_status("c1").error.unwrap().message;
    assert!(
        e.contains("actor a1 was stopped: stopped by request"),
        "{e}"
    );
}

#[test]
fn a_submitted_job_waits_for_a_node_for_its_driver_and_fails_with_the_node() {
    let mut s = State::default();
    let mut j = job("d");
    j.attached = false;
    j.resources = cpus(1.0);
    s.add_job(j);
    s.schedule();
    assert_eq!(s.job("d").unwrap().status.state, JobState::Pending);
    let (n1, mut rx) = join(&mut s, 2.0, "a");
    s.schedule();
    let j = s.job("d").unwrap();
    assert_eq!(
        (j.status.state, j.status.node_id.as_str()),
        (JobState::Running, n1.as_str())
    );
    assert!(matches!(sent(&mut rx).as_slice(), [c] if c.starts_with("StartDriver")));
    s.node_died(&n1);
    let j = s.job("d").unwrap();
    assert_eq!(j.status.state, JobState::Failed);
    assert!(
        j.status.error.contains("the driver's node node-1 died"),
        "{}",
        j.status.error
    );
}

/// A head restarted on the state folder of one before it: a running job waits for its
/// driver. The driver's node rejoins under its id with the driver and the objects it
/// kept; the driver submits its tasks again: one whose object was kept is done at
/// once, the others run. A node this head declared dead cannot rejoin. A job whose
/// driver does not come back in time starts again (or, attached, fails).
#[test]
fn a_restarted_head_takes_back_the_drivers_and_objects_its_nodes_kept() {
    let mut s = State::default();
    let restored = |id: &str, attached: bool, node: &str| {
        let mut j = job(id);
        j.attached = attached;
        j.resources = cpus(1.0);
        j.status.state = JobState::Running;
        j.status.node_id = node.into();
        j
    };
    let mut finished = job("f");
    finished.status.state = JobState::Succeeded;
    for j in [
        restored("r", false, "node-9"),
        restored("gone", false, "node-8"),
        restored("a", true, ""),
        finished,
    ] {
        s.restore_job(j);
    }
    let state = |s: &State, id: &str| s.job(id).unwrap().status.state;
    for id in ["r", "gone", "a"] {
        assert_eq!(state(&s, id), JobState::Running, "{id}");
    }
    assert_eq!(state(&s, "f"), JobState::Succeeded);
    assert!(s.pending_jobs.is_empty());

    let kept = Kept {
        objects: vec![
            KeptObject {
                id: "r:t1".into(),
                job: "r".into(),
                bytes: 100,
                rows: 7,
            },
            KeptObject {
                id: "f:t0".into(),
                job: "f".into(),
                bytes: 5,
                rows: 1,
            },
            KeptObject {
                id: "r:t9".into(),
                job: "r".into(),
                bytes: 5,
                rows: 1,
            },
        ],
        drivers: vec!["r".into(), "f".into()],
        running: ["r:t5", "r:t6"]
            .map(|id| KeptRun {
                id: id.into(),
                job: "r".into(),
                attempt: 2,
                cpus: 1.0,
                actor_call: false,
            })
            .into(),
        actors: vec![],
    };
    let node = NodeRegistration {
        hostname: "h".into(),
        object_address: "a".into(),
        total: cpus(4.0),
        object_store_memory: 1 << 30,
        ..Default::default()
    };
    // Drivers wait for the nodes the head before had.
    s.expect_nodes(vec!["node-9".into(), "node-7".into()]);
    assert!(s.recovering());
    let rejoined = s.rejoin_node("node-9", node.clone(), kept).unwrap();
    assert!(s.recovering(), "node-7 may still come");
    s.awaiting_until = Some(Instant::now() - Duration::from_secs(1));
    assert!(!s.recovering(), "not for ever");
    assert_eq!(
        rejoined.drop_jobs,
        ["f"],
        "the ended job's driver and objects go"
    );
    assert!(rejoined.free_objects.is_empty());
    assert!(s.next_node >= 9, "node-9's number is not given out again");
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.attach("node-9", tx).unwrap();
    assert!(s.job("r").unwrap().resume_by.is_none());
    assert_eq!(
        s.nodes["node-9"].available.num_cpus, 1.0,
        "the driver's CPU, and those of the two tasks that ran on"
    );
    // One of them ends before its driver replays: its object waits for the replay.
    assert!(s.task_reported(report("node-9", "r:t6", 2, 10, "")));
    assert_eq!(s.nodes["node-9"].available.num_cpus, 2.0);
    // The driver replays: the kept object's task is done, the other one runs.
    let replayed = |id: &str| TaskSpec {
        job_id: "r".into(),
        ..task(id, &[])
    };
    s.submit(replayed("r:t1")).unwrap();
    s.submit(replayed("r:t2")).unwrap();
    s.submit(replayed("r:t5")).unwrap();
    s.submit(replayed("r:t6")).unwrap();
    // A second replay changes nothing.
    s.submit(replayed("r:t1")).unwrap();
    // The node's own report of the task whose kept object was claimed comes late: its
    // result stands (a write keeps its effects).
    assert!(s.task_reported(report("node-9", "r:t1", 0, 100, "")));
    s.schedule();
    let st = s.object_status("r:t1");
    assert!(st.ready);
    let loc = st.location.unwrap();
    assert_eq!((loc.rows, loc.bytes), (7, 100));
    assert_eq!(loc.addresses, ["a"]);
    let runs: Vec<String> = sent(&mut rx)
        .into_iter()
        .filter(|c| c.starts_with("run "))
        .collect();
    assert_eq!(runs, ["run r:t2"], "r:t5 runs on where it ran");
    assert!(s.object_status("r:t6").ready);
    assert!(matches!(&s.tasks["r:t5"].state, TaskState::Running { node, .. } if node == "node-9"));
    assert_eq!(s.tasks["r:t5"].attempt, 2);
    assert!(s.task_reported(report("node-9", "r:t5", 2, 10, "")));
    assert!(s.object_status("r:t5").ready);
    assert!(s.task_reported(report("node-9", "r:t2", 0, 10, "")));
    assert_eq!(
        s.nodes["node-9"].available.num_cpus, 3.0,
        "the driver's CPU"
    );

    // A task its driver had freed comes back as lineage: done, not run, until a
    // reader needs its object.
    s.submit(TaskSpec {
        made: true,
        ..replayed("r:p")
    })
    .unwrap();
    s.schedule();
    assert_eq!(s.tasks["r:p"].state, TaskState::Done);
    assert!(sent(&mut rx).is_empty());
    s.submit(TaskSpec {
        args: vec!["r:p".into()],
        arg_batches: vec![None],
        ..replayed("r:c")
    })
    .unwrap();
    s.free(&["r:p".to_string()]);
    s.schedule();
    assert_eq!(sent(&mut rx), ["run r:p"]);
    // The replay is over: the kept object no task claimed goes.
    s.driver_alive("r", true).unwrap();
    assert_eq!(sent(&mut rx), ["free r:t9"]);
    assert!(s.adopted.is_empty());
    // A node that rejoins after the replay: nothing of it is claimed any more.
    let late = s
        .rejoin_node(
            "node-7",
            NodeRegistration {
                object_address: "b".into(),
                total: cpus(2.0),
                ..Default::default()
            },
            Kept {
                objects: vec![KeptObject {
                    id: "r:t8".into(),
                    job: "r".into(),
                    bytes: 1,
                    rows: 1,
                }],
                drivers: vec![],
                running: vec![KeptRun {
                    id: "r:t2".into(),
                    job: "r".into(),
                    attempt: 0,
                    cpus: 1.0,
                    actor_call: false,
                }],
                actors: vec![],
            },
        )
        .unwrap();
    assert_eq!(late.free_objects, ["r:t8"]);
    assert_eq!(late.cancel_tasks, ["r:t2"]);
    assert_eq!(s.nodes["node-7"].available.num_cpus, 2.0);
    // A late word of a driver on another node changes nothing.
    s.driver_exited("r", "node-5", 1, "");
    assert_eq!(state(&s, "r"), JobState::Running);

    // node-9 is known now: it cannot rejoin again.
    assert!(s
        .rejoin_node("node-9", node.clone(), Kept::default())
        .is_err());
    s.node_died("node-9");
    assert!(s.rejoin_node("node-9", node, Kept::default()).is_err());

    // The drivers that did not come back in time.
    for id in ["gone", "a"] {
        s.jobs.get_mut(id).unwrap().resume_by = Some(Instant::now() - Duration::from_secs(1));
    }
    s.check_resumes();
    assert_eq!(state(&s, "gone"), JobState::Pending);
    assert!(s.job("gone").unwrap().status.node_id.is_empty());
    assert!(s.pending_jobs.contains("gone"));
    assert_eq!(state(&s, "a"), JobState::Failed);
}

/// A node rejoins a restarted head with the CPU actors it kept alive (and a call one
/// of them runs): their resources are held until the driver's replay, which takes
/// back the actor it creates again (alive, in the same process) and the running call;
/// an actor the replay does not name stops, one no node kept starts anew, and one that
/// dies before the replay gives its resources back.
#[test]
fn a_restarted_head_takes_back_the_actors_its_nodes_kept() {
    let mut s = State::default();
    let mut j = job("r");
    j.attached = false;
    j.resources = cpus(1.0);
    j.status.state = JobState::Running;
    j.status.node_id = "node-9".into();
    s.restore_job(j);
    let actor = |id: &str, incarnation: u32, pid: u32| KeptActor {
        id: id.into(),
        job: "r".into(),
        incarnation,
        pid,
        resources: cpus(1.0),
    };
    let kept = Kept {
        drivers: vec!["r".into()],
        running: ["r:c1", "r:c9", "r:c3"]
            .map(|id| KeptRun {
                id: id.into(),
                job: "r".into(),
                attempt: 0,
                cpus: 0.0,
                actor_call: true,
            })
            .into(),
        actors: vec![actor("a1", 2, 77), actor("a2", 1, 78), actor("a3", 1, 79)],
        ..Default::default()
    };
    let node = NodeRegistration {
        hostname: "h".into(),
        object_address: "a".into(),
        total: cpus(4.0),
        object_store_memory: 1 << 30,
        ..Default::default()
    };
    let rejoined = s.rejoin_node("node-9", node, kept).unwrap();
    assert!(rejoined.stop_actors.is_empty() && rejoined.cancel_tasks.is_empty());
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.attach("node-9", tx).unwrap();
    assert_eq!(
        s.nodes["node-9"].available.num_cpus, 0.0,
        "the driver and three actors held"
    );
    // a3 dies before the replay: its CPU comes back.
    s.actor_reported("a3", "node-9", 1, false, 0, "exit 3");
    assert_eq!(s.nodes["node-9"].available.num_cpus, 1.0);
    // A call's own code fails before the replay: the failure is kept for it.
    let failed = TaskReport {
        outcome: TaskOutcome::Failed(ErrorReport::new(ErrorKind::UserFunction, "no such key")),
        ..report("node-9", "r:c3", 0, 0, "")
    };
    assert!(s.task_reported(failed));
    // The replay: a1 goes on where it lives; a4, which no node kept, starts anew.
    let spec = |id: &str| ActorSpec {
        job_id: "r".into(),
        actor_id: id.into(),
        resources: cpus(1.0),
        ..Default::default()
    };
    s.create_actor(spec("a1")).unwrap();
    s.create_actor(spec("a4")).unwrap();
    let a1 = s.actor("a1").unwrap();
    assert_eq!(
        a1.state,
        ActorState::Alive {
            node: "node-9".into()
        }
    );
    assert_eq!((a1.pid, a1.restarts), (Some(77), 1));
    // Its running call is taken back where it runs; the next one goes to it.
    let call = |id: &str| TaskSpec {
        job_id: "r".into(),
        actor: Some("a1".into()),
        resources: cpus(0.0),
        ..task(id, &[])
    };
    s.submit(call("r:c1")).unwrap();
    s.submit(call("r:c2")).unwrap();
    // A call that ran on an actor no node kept runs again on the actor started anew,
    // as a later attempt (a late report of the old one is stale).
    s.submit(TaskSpec {
        actor: Some("a4".into()),
        ..call("r:c9")
    })
    .unwrap();
    assert_eq!(s.tasks["r:c9"].attempt, 1);
    // The failed call fails so when replayed, instead of changing a1 again.
    s.submit(call("r:c3")).unwrap();
    let e = s.object_status("r:c3").error.expect("it failed");
    assert_eq!(e.message, "no such key");
    s.schedule();
    assert_eq!(s.tasks["r:c9"].state, TaskState::Pending, "a4 is starting");
    assert!(!s.task_reported(report("node-9", "r:c9", 0, 10, "")));
    assert!(matches!(&s.tasks["r:c1"].state, TaskState::Running { node, .. } if node == "node-9"));
    let commands = sent(&mut rx);
    assert!(commands.contains(&"run r:c2".to_string()), "{commands:?}");
    assert!(!commands.contains(&"run r:c3".to_string()), "{commands:?}");
    assert!(
        commands
            .iter()
            .any(|c| c.contains("StartActor") && c.contains("\"a4\"")),
        "{commands:?}"
    );
    assert_eq!(
        s.nodes["node-9"].available.num_cpus, 0.0,
        "the driver, a1, a2 (still held) and a4; the calls hold nothing"
    );
    // The replay is over: a2, which it did not name, stops, and its CPU comes back.
    s.driver_alive("r", true).unwrap();
    assert_eq!(sent(&mut rx), ["StopActor(\"a2\")"]);
    assert_eq!(s.nodes["node-9"].available.num_cpus, 1.0);
    assert!(s.task_reported(report("node-9", "r:c1", 0, 10, "")));
    assert!(s.object_status("r:c1").ready);
    assert_eq!(s.nodes["node-9"].available.num_cpus, 1.0);
}

/// A running job's actors' restarts and deaths are kept in its record (and go with
/// its end): a restarted head, replayed an actor that died for good, keeps it dead
/// (its calls fail saying why) and counts a restarted actor's restarts against its
/// limit.
#[test]
fn an_actors_restarts_and_death_outlive_a_head_restart() {
    let (mut s, _rx) = one_node(4.0);
    let spec = |id: &str, max_restarts: u32| ActorSpec {
        job_id: "j".into(),
        actor_id: id.into(),
        resources: cpus(1.0),
        max_restarts,
        ..Default::default()
    };
    s.create_actor(spec("a1", 0)).unwrap();
    s.create_actor(spec("a2", 2)).unwrap();
    s.schedule();
    s.actor_reported("a1", "n1", 1, true, 10, "");
    s.actor_reported("a2", "n1", 1, true, 11, "");
    s.actor_reported("a1", "n1", 1, false, 0, "exit 3");
    s.actor_reported("a2", "n1", 1, false, 0, "exit 4");
    let history = s.jobs["j"].actor_history.clone();
    assert_eq!(
        history["a1"],
        ActorHistory {
            restarts: 0,
            dead: Some("exit 3".into())
        }
    );
    assert_eq!(history["a2"].restarts, 1);
    assert_eq!(history["a2"].dead, None);

    // A head after this one restores the job with that history; the driver replays.
    let mut t = State::default();
    let mut kept = job("j");
    kept.status.state = JobState::Running;
    kept.actor_history = history;
    t.restore_job(kept);
    let (node, mut rx) = test_node(4.0, "a");
    t.nodes.insert("n1".into(), node);
    t.create_actor(spec("a1", 0)).unwrap();
    t.create_actor(spec("a2", 2)).unwrap();
    t.schedule();
    let a1 = t.actor("a1").unwrap();
    assert_eq!(a1.state, ActorState::Dead("exit 3".into()));
    let commands = sent(&mut rx);
    assert!(
        !commands.iter().any(|c| c.contains("\"a1\"")),
        "a1 is not started again: {commands:?}"
    );
    t.submit(TaskSpec {
        actor: Some("a1".into()),
        resources: cpus(0.0),
        ..task("c1", &[])
    })
    .unwrap();
    t.schedule();
    let e = t.object_status("c1").error.expect("the call fails");
    assert_eq!(e.message, "actor a1 is dead: exit 3");
    // a2 had one restart of two: one more, then it dies for good.
    assert_eq!(t.actor("a2").unwrap().restarts, 1);
    t.actor_reported("a2", "n1", 1, true, 12, "");
    t.actor_reported("a2", "n1", 1, false, 0, "exit 5");
    assert_eq!(t.actor("a2").unwrap().restarts, 2);
    t.schedule();
    t.actor_reported("a2", "n1", 2, true, 13, "");
    t.actor_reported("a2", "n1", 2, false, 0, "exit 6");
    assert_eq!(
        t.actor("a2").unwrap().state,
        ActorState::Dead("exit 6".into())
    );
    // The job's end takes its history with it.
    t.finish_job("j", JobState::Succeeded, 0, "");
    assert!(t.jobs["j"].actor_history.is_empty());
}

#[test]
fn reduce_tasks_name_a_group_of_map_outputs_once_and_it_holds_them() {
    let (mut s, mut rx) = one_node(1.0);
    for m in ["m0", "m1", "m2"] {
        submit(&mut s, m);
        s.schedule();
        assert!(s.task_reported(report("n1", m, 0, 10, "")));
    }
    sent(&mut rx);
    let maps: Vec<String> = ["m0", "m1", "m2"].map(String::from).into();
    s.create_object_group("j", "g", maps.clone()).unwrap();
    // The driver lets the map outputs go: the group still holds them.
    s.free(&maps);
    assert_eq!(s.objects.len(), 3);
    // Each reduce task names the group once, with its partition.
    for p in 0..2u32 {
        let mut t = task(&format!("r{p}"), &["g"]);
        t.arg_batches = vec![Some(p)];
        s.submit(t).unwrap();
    }
    assert!(s.tasks["r0"].spec.args.len() == 1);
    s.schedule();
    let first = match rx.try_recv().unwrap() {
        NodeCommand::RunTask(a) => a,
        other => panic!("{other:?}"),
    };
    // The node gets every map output, each with the task's partition.
    let args: Vec<(&str, Option<u32>)> = first
        .args
        .iter()
        .map(|l| (l.object_id.as_str(), l.batch))
        .collect();
    assert_eq!(args, [("m0", Some(0)), ("m1", Some(0)), ("m2", Some(0))]);
    s.free(&["g".to_string()]);
    assert_eq!(s.objects.len(), 5, "reduce tasks still read the group");
    assert!(s.task_reported(report("n1", "r0", 0, 1, "")));
    s.schedule();
    assert!(s.task_reported(report("n1", "r1", 0, 1, "")));
    // The last reader done: the group and its map outputs go.
    assert!(s.object_groups.is_empty());
    assert_eq!(
        s.objects.keys().map(String::as_str).collect::<HashSet<_>>(),
        HashSet::from(["r0", "r1"])
    );
    let freed = sent(&mut rx);
    for m in ["m0", "m1", "m2"] {
        assert!(freed.contains(&format!("free {m}")), "{freed:?}");
    }
    // Unknown members are refused, naming the object, and so are another job's.
    let e = s
        .create_object_group("j", "g2", vec!["nope".into()])
        .unwrap_err();
    assert!(e.to_string().contains("object nope (of group g2)"), "{e}");
    s.add_job(job("k"));
    let e = s
        .create_object_group("k", "g3", vec!["r0".into()])
        .unwrap_err();
    assert!(e.to_string().contains("belongs to job j, not k"), "{e}");
}

#[test]
fn a_lost_map_output_in_a_group_is_rebuilt_before_its_reduce_task_runs() {
    let mut s = State::default();
    s.add_job(job("j"));
    let (n1, mut rx1) = join(&mut s, 1.0, "a");
    s.submit(task("m0", &[])).unwrap();
    s.schedule();
    assert!(s.task_reported(report(&n1, "m0", 0, 10, "")));
    s.create_object_group("j", "g", vec!["m0".into()]).unwrap();
    // The driver let m0 go: the group still wants it, so its loss is rebuilt.
    s.free(&["m0".to_string()]);
    let (n2, mut rx2) = join(&mut s, 1.0, "b");
    sent(&mut rx1);
    s.node_died(&n1);
    assert_eq!(s.tasks["m0"].state, TaskState::Pending);
    let mut r = task("r0", &["g"]);
    r.arg_batches = vec![Some(0)];
    s.submit(r).unwrap();
    s.schedule();
    // m0 runs again first; r0 waits for it.
    assert_eq!(sent(&mut rx2), ["run m0"]);
    assert!(s.task_reported(report(&n2, "m0", 1, 10, "")));
    s.schedule();
    assert_eq!(sent(&mut rx2), ["run r0"]);
}

#[test]
fn tasks_ahead_are_counted_by_their_cpus_as_they_come_and_go() {
    let mut q = AheadQueue::default();
    let (one, two) = (1f64.to_bits(), 2f64.to_bits());
    q.push("a", one);
    q.push("b", two);
    q.push("c", one);
    assert_eq!((q.waiting(one), q.waiting(two), q.len()), (2, 1, 3));
    q.remove("c");
    q.remove("not there");
    assert_eq!((q.waiting(one), q.len()), (1, 2));
    assert_eq!(q.pop_front().as_deref(), Some("a"));
    assert_eq!((q.waiting(one), q.waiting(two)), (0, 1));
    assert_eq!(q.front(), Some("b"));
    q.remove("b");
    assert!(q.is_empty() && q.waiting(two) == 0 && q.pop_front().is_none());
}

#[test]
fn a_task_waits_a_while_for_the_node_holding_its_big_input() {
    let (mut s, mut rx1) = one_node(1.0);
    let (n2, mut rx2) = test_node(1.0, "b");
    s.nodes.insert("n2".into(), n2);
    let on = |s: &State, id: &str| match &s.tasks[id].state {
        TaskState::Running { node, .. } => node.clone(),
        other => panic!("{id} is {other:?}"),
    };
    // "big" (150 MiB) and "small" (1 MiB) are made on one node, X.
    s.submit(task("big", &[])).unwrap();
    s.schedule();
    let x = on(&s, "big");
    let (y, rx_x, rx_y) = if x == "n1" {
        ("n2", &mut rx1, &mut rx2)
    } else {
        ("n1", &mut rx2, &mut rx1)
    };
    assert!(s.task_reported(report(&x, "big", 0, 150 << 20, "")));
    s.submit(task("small", &[])).unwrap();
    s.schedule();
    let at = on(&s, "small");
    assert!(s.task_reported(report(&at, "small", 0, 1 << 20, "")));
    s.objects.get_mut("small").unwrap().locations = vec![x.clone()];
    s.schedule();
    sent(rx_x);
    sent(rx_y);
    // X is busy with r1. Its tasks are not measured yet, so r2 does not go ahead there
    // (it might wait there past its time), and it does not go to Y either, which would
    // fetch 150 MiB: it waits in the queue.
    let read = |id: &str| TaskSpec {
        name: "read".into(),
        ..task(id, &["big"])
    };
    for id in ["r1", "r2"] {
        s.submit(read(id)).unwrap();
    }
    s.schedule();
    assert_eq!(sent(rx_x), ["run r1"]);
    assert!(sent(rx_y).is_empty());
    assert_eq!(s.tasks["r2"].state, TaskState::Pending);
    // Measured at 0.2 s, they go ahead on X while they would start within their wait
    // (1.5 s for 150 MiB): r2 and r3 (two per slot), then r4 in the queue.
    s.jobs
        .get_mut("j")
        .unwrap()
        .task_seconds
        .insert("read".into(), 0.2);
    for id in ["r3", "r4"] {
        s.submit(read(id)).unwrap();
    }
    s.schedule();
    assert_eq!(sent(rx_x), ["ahead r2", "ahead r3"]);
    assert!(sent(rx_y).is_empty());
    assert_eq!(s.tasks["r4"].state, TaskState::Pending);
    // A task with a small input does not wait: it runs on Y at once.
    s.submit(task("t", &["small"])).unwrap();
    s.schedule();
    assert_eq!(sent(rx_y), ["run t"]);
    assert!(s.task_reported(report(y, "t", 0, 0, "")));
    // Once r4 has waited as long as its input would take to travel, it runs on Y.
    *s.tasks.get_mut("r4").unwrap().ready_since.as_mut().unwrap() -= LOCALITY_WAIT;
    s.schedule();
    assert_eq!(sent(rx_y), ["run r4"]);
    // Nor does a task reading one batch of the big object (a reduce task).
    let mut one_batch = task("b", &["big"]);
    one_batch.arg_batches = vec![Some(0)];
    s.submit(one_batch).unwrap();
    s.schedule();
    assert!(sent(rx_x).is_empty());
    assert_eq!(
        sent(rx_y),
        ["ahead b"],
        "behind r4, not behind r1, r2 and r3"
    );
    assert_eq!(
        TaskEntry::locality_wait(150 << 20),
        Duration::from_millis(1500)
    );
    assert_eq!(TaskEntry::locality_wait(100 << 30), LOCALITY_WAIT);
    // Nor does one whose job's workers X could not start lately: it runs on Y at once.
    for id in ["r4", "b"] {
        let attempt = s.tasks[id].attempt;
        assert!(s.task_reported(report(y, id, attempt, 0, "")), "{id}");
        s.schedule();
    }
    sent(rx_y);
    s.jobs.get_mut("j").unwrap().no_workers.insert(
        (x.clone(), false),
        (std::time::Instant::now(), "its workers exit".into()),
    );
    s.submit(read("r5")).unwrap();
    s.schedule();
    assert_eq!(sent(rx_y), ["run r5"]);
}

#[test]
fn an_input_let_go_once_mapped_keeps_its_lineage_until_its_reader_goes() {
    let mut s = State::default();
    s.add_job(job("j"));
    let (n1, mut rx1) = join(&mut s, 1.0, "a");
    // b0 (a read task) makes a block; m0 (a map task) reads it.
    s.submit(task("b0", &[])).unwrap();
    s.schedule();
    assert!(s.task_reported(report(&n1, "b0", 0, 10, "")));
    s.submit(task("m0", &["b0"])).unwrap();
    s.schedule();
    assert!(s.task_reported(report(&n1, "m0", 0, 10, "")));
    assert_eq!(sent(&mut rx1), ["run b0", "run m0"]);
    // The driver lets the block go once it is mapped: its copy goes, its lineage stays.
    s.free(&["b0".to_string()]);
    assert_eq!(sent(&mut rx1), ["free b0"]);
    assert!(s.objects["b0"].locations.is_empty());
    assert_eq!(s.tasks["b0"].state, TaskState::Done);
    assert_eq!(s.nodes[&n1].stored, 10, "only m0's bytes are counted");
    // m0's output is lost with its node: the block is read again first, then mapped.
    let (n2, mut rx2) = join(&mut s, 1.0, "b");
    s.node_died(&n1);
    assert_eq!(s.tasks["m0"].state, TaskState::Pending);
    assert_eq!(s.tasks["b0"].state, TaskState::Pending);
    s.schedule();
    assert_eq!(sent(&mut rx2), ["run b0"]);
    assert!(s.task_reported(report(&n2, "b0", 1, 10, "")));
    s.schedule();
    assert_eq!(sent(&mut rx2), ["run m0"]);
    assert!(s.task_reported(report(&n2, "m0", 1, 10, "")));
    // The block, read only by m0, went again once m0 was done.
    assert_eq!(sent(&mut rx2), ["free b0"]);
    assert!(s.objects["m0"].locations == [n2.clone()]);
    // The map output freed: the task goes, and the block's lineage with it.
    s.free(&["m0".to_string()]);
    assert_eq!(sent(&mut rx2), ["free m0"]);
    assert!(s.objects.is_empty() && s.tasks.is_empty());
    assert_eq!(s.nodes[&n2].stored, 0);

    // A driver's own object cannot be made again: freed while a kept task reads it,
    // it is kept whole.
    s.put_object("j", "p0", "b", 5, 1).unwrap();
    s.submit(task("m1", &["p0"])).unwrap();
    s.schedule();
    assert!(s.task_reported(report(&n2, "m1", 0, 10, "")));
    s.free(&["p0".to_string()]);
    assert_eq!(s.objects["p0"].locations, std::slice::from_ref(&n2));
    s.free(&["m1".to_string()]);
    assert!(s.objects.is_empty(), "both go with their last reader");
    let freed = sent(&mut rx2);
    assert!(freed.contains(&"free p0".to_string()), "{freed:?}");
}

#[test]
fn lineage_is_kept_one_task_deep_and_a_task_naming_a_let_go_input_makes_it_again() {
    let (mut s, mut rx) = one_node(1.0);
    let run = |s: &mut State, id: &str, args: &[&str]| {
        s.submit(task(id, args)).unwrap();
        s.schedule();
        assert!(s.task_reported(report("n1", id, 0, 10, "")));
    };
    // r0 ─▶ b0 ─▶ m0: each freed once its reader is done.
    run(&mut s, "r0", &[]);
    run(&mut s, "b0", &["r0"]);
    s.free(&["r0".to_string()]);
    assert!(s.objects["r0"].lineage_only, "b0's task may read r0 again");
    run(&mut s, "m0", &["b0"]);
    s.free(&["b0".to_string()]);
    // b0's task read a freed input: b0 is kept whole for m0, not made again.
    assert!(!s.objects["b0"].lineage_only);
    assert_eq!(s.objects["b0"].locations, ["n1".to_string()]);
    assert_eq!(sent(&mut rx), ["run r0", "run b0", "free r0", "run m0"]);
    // m0 goes: b0 and, with it, r0's lineage.
    s.free(&["m0".to_string()]);
    assert!(s.objects.is_empty() && s.tasks.is_empty());
    assert_eq!(sent(&mut rx), ["free m0", "free b0"]);

    // r1 ─▶ b1 ─▶ m1 with r1 held: b1 keeps only its lineage, one task deep. Freed
    // later, r1 goes for good; a task naming b1 makes it again first, which fails
    // naming r1, and the task with it (it does not wait forever).
    run(&mut s, "r1", &[]);
    run(&mut s, "b1", &["r1"]);
    run(&mut s, "m1", &["b1"]);
    s.free(&["b1".to_string()]);
    assert!(s.objects["b1"].lineage_only);
    s.free(&["r1".to_string()]);
    assert!(!s.objects.contains_key("r1"));
    s.submit(task("x", &["b1"])).unwrap();
    s.schedule();
    s.schedule();
    assert_eq!(s.tasks["x"].state, TaskState::Failed);
    let e = s.objects["x"].error.as_ref().unwrap();
    let e = format!("{e:?}");
    assert!(e.contains("input object r1 was freed"), "{e}");
    sent(&mut rx);

    // c0 ─▶ n0, c0 let go: a task submitted later that names it reads it again.
    run(&mut s, "c0", &[]);
    run(&mut s, "n0", &["c0"]);
    s.free(&["c0".to_string()]);
    assert_eq!(sent(&mut rx), ["run c0", "run n0", "free c0"]);
    assert_eq!(
        s.object_status("c0").location,
        None,
        "let go: unknown to drivers"
    );
    s.submit(task("y", &["c0"])).unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx), ["run c0"]);
    assert!(s.task_reported(report("n1", "c0", 1, 10, "")));
    s.schedule();
    assert_eq!(sent(&mut rx), ["run y"]);
    // The job ends with y running and everything else freed: its end takes the
    // tasks that y's failure lets go with it.
    s.free(&[
        "n0".to_string(),
        "y".to_string(),
        "b0".to_string(),
        "m0".to_string(),
    ]);
    s.finish_job("j", JobState::Failed, 1, "stopped");
    assert!(s.tasks.is_empty() && s.objects.is_empty());
}

#[test]
fn a_driver_asking_more_than_any_node_has_says_so_and_starts_once_one_joins() {
    let mut s = State::default();
    let driver = |s: &mut State, id: &str, n: f64| {
        let mut j = job(id);
        j.attached = false;
        j.resources = cpus(n);
        s.add_job(j);
        s.schedule();
    };
    let reason = |s: &State, id: &str| s.waiting().get(id).cloned();
    driver(&mut s, "big", 64.0);
    assert_eq!(
        reason(&s, "big"),
        Some(Waiting {
            reason: "its driver waits for a node to join the cluster".into(),
            kind: WaitKind::Node,
        })
    );
    join(&mut s, 1.0, "a");
    join(&mut s, 1.0, "b");
    s.schedule();
    assert_eq!(
        reason(&s, "big"),
        Some(Waiting {
            reason: "its driver asks for 64 CPU: no node has 64 CPU (the most on one node \
                     is 1); it waits until a node with enough joins"
                .into(),
            kind: WaitKind::BeyondNodes,
        })
    );
    // Drivers that fit run; one more waits for room, which is no mistake.
    driver(&mut s, "one", 1.0);
    driver(&mut s, "two", 1.0);
    driver(&mut s, "three", 1.0);
    assert_eq!(s.job("two").unwrap().status.state, JobState::Running);
    assert_eq!(
        reason(&s, "three"),
        Some(Waiting {
            reason: "its driver waits for 1 CPU free on one node".into(),
            kind: WaitKind::Room,
        })
    );
    assert_eq!(reason(&s, "one"), None);
    join(&mut s, 65.0, "c");
    s.schedule();
    assert_eq!(s.job("big").unwrap().status.state, JobState::Running);
    assert!(s.waiting().is_empty(), "{:?}", s.waiting());
}

/// Registers and attaches a node offering `total`, with one GPU.
fn join_gpu_node(s: &mut State, total: Resources) -> Commands {
    let id = s.register_node(NodeRegistration {
        hostname: "h".into(),
        object_address: "g".into(),
        total,
        gpu_ids: vec![0],
        ..Default::default()
    });
    let (tx, rx) = mpsc::unbounded_channel();
    s.attach(&id, tx).unwrap();
    rx
}

/// Job `j`'s groups `pack` (STRICT_PACK, two bundles of 2 CPUs) and `spread`
/// (STRICT_SPREAD, two bundles of 1 CPU): neither fits one node of 2 CPUs.
fn strict_groups_beyond_one_node(s: &mut State) {
    s.create_group("j", "pack", Strategy::StrictPack, vec![cpus(2.0); 2])
        .unwrap();
    s.create_group("j", "spread", Strategy::StrictSpread, vec![cpus(1.0); 2])
        .unwrap();
}

#[test]
fn work_asking_more_than_any_node_has_is_named_in_its_job_s_wait() {
    let (mut s, _rx) = one_node(2.0);
    let named = |id: &str, name: &str, r: Resources| TaskSpec {
        name: name.into(),
        resources: r,
        ..task(id, &[])
    };
    for i in 0..3 {
        s.submit(named(&format!("g{i}"), "gpu_map", cpus(1.0).with_gpus(1.0)))
            .unwrap();
    }
    s.submit(named("w", "wide", cpus(4.0))).unwrap();
    // Tasks that fit the node wait only for room.
    for i in 0..6 {
        s.submit(named(&format!("t{i}"), "small", cpus(1.0)))
            .unwrap();
    }
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "a".into(),
        name: "Scorer".into(),
        resources: cpus(1.0).with_custom("tpu", 1.0),
        ..Default::default()
    })
    .unwrap();
    strict_groups_beyond_one_node(&mut s);
    s.schedule();
    let w = s.waiting().remove("j").expect("job j waits");
    assert_eq!(w.kind, WaitKind::BeyondNodes);
    assert_eq!(
        w.reason,
        "3 tasks `gpu_map` each ask for 1 CPU, 1 GPU: no node has 1 GPU (none has any); \
         task `wide` asks for 4 CPU: no node has 4 CPU (the most on one node is 2); \
         actor `Scorer` asks for 1 CPU, 1 tpu: no node has 1 `tpu` (none has any); \
         and 2 more; it waits until a node with enough joins"
    );
    // Each such task and actor says so in its record too; the others do not.
    let (tasks, total) = s.job_tasks("j").unwrap();
    assert_eq!(total, tasks.len());
    let waits = |name: &str| -> Vec<&str> {
        tasks
            .iter()
            .filter(|t| t.name == name)
            .map(|t| t.waiting.as_str())
            .collect()
    };
    assert_eq!(
        waits("gpu_map"),
        ["asks for 1 CPU, 1 GPU: no node has 1 GPU (none has any)"; 3]
    );
    assert!(waits("small").iter().all(|w| w.is_empty()));
    assert_eq!(
        s.job_actors("j").unwrap()[0].waiting,
        "asks for 1 CPU, 1 tpu: no node has 1 `tpu` (none has any)"
    );
    // The groups, once the rest fits.
    let big = Resources::cpus(4.0)
        .with_gpus(1.0)
        .with_custom("tpu", 1.0)
        .with_memory(1 << 30);
    let _rx2 = join_gpu_node(&mut s, big);
    s.schedule();
    // Both groups fit now (one node holds all of `pack`; `spread` has two nodes).
    assert_eq!(s.waiting().get("j"), None, "{:?}", s.waiting());
}

#[test]
fn placement_groups_no_node_set_can_hold_are_named() {
    let (mut s, _rx) = one_node(2.0);
    strict_groups_beyond_one_node(&mut s);
    s.create_group("j", "wide", Strategy::Pack, vec![cpus(1.0), cpus(3.0)])
        .unwrap();
    s.schedule();
    let w = s.waiting().remove("j").expect("job j waits");
    assert_eq!(
        w.reason,
        "placement group pack (STRICT_PACK: all on one node) asks for 4 CPU: no node has \
         4 CPU (the most on one node is 2); \
         placement group spread (STRICT_SPREAD: one node per bundle) has 2 bundles and 1 \
         node(s) take work; \
         placement group wide: bundle 1 asks for 3 CPU: no node has 3 CPU (the most on one \
         node is 2); it waits until a node with enough joins"
    );
}

#[test]
fn work_no_node_could_hold_does_not_keep_tasks_from_going_ahead() {
    let (mut s, mut rx) = one_node(1.0);
    let mut driver = job("d");
    driver.attached = false;
    driver.resources = cpus(64.0);
    s.add_job(driver);
    assert_eq!(sent(&mut rx), ["PrepareJob(\"d\")"]);
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "a".into(),
        resources: cpus(1.0).with_gpus(1.0),
        ..Default::default()
    })
    .unwrap();
    strict_groups_beyond_one_node(&mut s);
    s.submit(TaskSpec {
        resources: cpus(1.0).with_custom("tpu", 1.0),
        ..task("tpu", &[])
    })
    .unwrap();
    submit(&mut s, "t1");
    submit(&mut s, "t2");
    s.schedule();
    assert_eq!(sent(&mut rx), ["run t1", "ahead t2"]);
    // An actor a node could hold, once room is free, holds tasks back again.
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "b".into(),
        resources: cpus(1.0),
        ..Default::default()
    })
    .unwrap();
    submit(&mut s, "t3");
    s.schedule();
    assert!(sent(&mut rx).is_empty(), "t3 waits at the head");
}

#[test]
fn a_request_each_part_of_which_some_node_has_but_none_has_all_is_named() {
    let (mut s, _rx) = one_node(8.0);
    let _rx2 = join_gpu_node(&mut s, cpus(1.0).with_gpus(1.0));
    s.submit(TaskSpec {
        name: "train".into(),
        resources: cpus(8.0).with_gpus(1.0),
        ..task("t", &[])
    })
    .unwrap();
    s.schedule();
    assert_eq!(
        s.waiting()["j"].reason,
        "task `train` asks for 8 CPU, 1 GPU: no one node has all of it; it waits until a \
         node with enough joins"
    );
}

/// A scheduling pass reads only the jobs and actors that wait (`pending_jobs`,
/// `pending_actors`): each enters as it starts waiting and leaves as it is placed or
/// ends, through every way there is. A dead actor's record keeps no payload.
#[test]
fn only_what_waits_is_in_the_scheduling_passes_view() {
    let mut s = State::default();
    let (n1, _rx1) = join(&mut s, 1.0, "a");
    // A job with a driver to place: waits until a pass places it.
    let mut driven = job("d");
    driven.attached = false;
    driven.resources = cpus(1.0);
    s.add_job(driven);
    s.add_job(job("j"));
    assert_eq!(Vec::from_iter(s.pending_jobs.iter().cloned()), ["d"]);
    s.schedule();
    assert!(s.pending_jobs.is_empty());
    assert_eq!(s.jobs["d"].status.state, JobState::Running);
    // An actor with no room (the driver holds the CPU) waits; a second node places it.
    let spec = |id: &str| ActorSpec {
        job_id: "j".into(),
        actor_id: id.into(),
        resources: cpus(1.0),
        max_restarts: 1,
        payload: bytes::Bytes::from_static(b"encoded actor"),
        ..Default::default()
    };
    s.create_actor(spec("a1")).unwrap();
    s.schedule();
    assert_eq!(Vec::from_iter(s.pending_actors.iter().cloned()), ["a1"]);
    let (n2, _rx2) = join(&mut s, 1.0, "b");
    s.schedule();
    assert!(s.pending_actors.is_empty());
    assert!(matches!(&s.actors["a1"].state, ActorState::Starting { node } if *node == n2));
    // Its node dies: it waits to restart (the driver's node is full), then its job ends.
    s.node_died(&n2);
    assert_eq!(Vec::from_iter(s.pending_actors.iter().cloned()), ["a1"]);
    assert!(
        !s.actors["a1"].spec.payload.is_empty(),
        "it starts again from it"
    );
    s.create_actor(spec("a2")).unwrap();
    s.finish_job("j", JobState::Succeeded, 0, "");
    s.schedule();
    assert!(s.pending_actors.is_empty());
    assert!(matches!(s.actors["a1"].state, ActorState::Dead(_)));
    // Dead for good, listed still, without the encoded actor it no longer needs.
    assert!(s.actors["a1"].spec.payload.is_empty());
    // A job restored by a restarted head whose driver does not come back waits for
    // a node to start it again.
    let mut kept = job("k");
    kept.attached = false;
    kept.status.state = JobState::Running;
    s.restore_job(kept);
    assert!(s.pending_jobs.is_empty());
    s.jobs.get_mut("k").unwrap().resume_by = Some(Instant::now() - Duration::from_secs(1));
    s.check_resumes();
    assert_eq!(Vec::from_iter(s.pending_jobs.iter().cloned()), ["k"]);
    s.finish_job("k", JobState::Stopped, 0, "");
    assert!(s.pending_jobs.is_empty());
    let _ = n1;
}

/// Object `id` failed as cancelled.
fn assert_cancelled(s: &State, id: &str) {
    let e = s
        .object_status(id)
        .error
        .unwrap_or_else(|| panic!("{id} did not fail"));
    assert_eq!(e.kind, ErrorKind::Cancelled, "{id}: {e:?}");
}

/// A cancelled task's GPU goes to no other task until its node reports the attempt
/// ended (the worker it kills may still hold the GPU's memory); its CPUs are free at once.
#[test]
fn a_cancelled_tasks_gpu_waits_for_its_worker_to_end() {
    let mut s = State::default();
    s.add_job(job("j"));
    let mut rx = join_gpu_node(&mut s, cpus(2.0).with_gpus(1.0));
    let node = s.nodes.keys().next().unwrap().clone();
    let gpu_task = |id: &str| TaskSpec {
        resources: cpus(1.0).with_gpus(1.0),
        ..task(id, &[])
    };
    s.submit(gpu_task("g1")).unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx), ["run g1"]);
    s.cancel("j", &["g1".into()]);
    s.submit(gpu_task("g2")).unwrap();
    submit(&mut s, "c1");
    s.schedule();
    // The CPU-only task runs; the GPU task waits for g1's worker.
    assert_eq!(sent(&mut rx), ["cancel g1", "run c1"]);
    assert_eq!(s.tasks["g2"].state, TaskState::Pending);
    // A report of another attempt of g1 frees nothing.
    let ended = |attempt| system_failure(&node, "g1", attempt, "cancelled");
    assert!(!s.task_reported(ended(7)));
    s.schedule();
    assert!(sent(&mut rx).is_empty());
    // The killed worker's attempt ended: g2 runs on the GPU.
    assert!(!s.task_reported(ended(0)));
    s.schedule();
    assert_eq!(sent(&mut rx), ["run g2"]);
    assert!(s.nodes[&node].cancelled_gpus.is_empty());
}

/// A killed actor's GPU goes to no other work until its node reports its process
/// gone; until then the actor is dead but not exited. Its CPU is free at once.
#[test]
fn a_killed_actors_gpu_waits_for_its_process_to_end() {
    let mut s = State::default();
    s.add_job(job("j"));
    let mut rx = join_gpu_node(&mut s, cpus(2.0).with_gpus(1.0));
    let node = s.nodes.keys().next().unwrap().clone();
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "a1".into(),
        resources: cpus(1.0).with_gpus(1.0),
        ..Default::default()
    })
    .unwrap();
    s.schedule();
    sent(&mut rx);
    let inc = s.actors["a1"].incarnation;
    s.actor_reported("a1", &node, inc, true, 42, "");
    assert!(!s.actor("a1").unwrap().exited);
    s.kill_actor("a1", "killed by request");
    s.kill_actor("a1", "killed again");
    let record = s.actor("a1").unwrap();
    assert!(matches!(record.state, ActorState::Dead(_)));
    assert!(!record.exited, "its process may still run");
    s.submit(TaskSpec {
        resources: cpus(1.0).with_gpus(1.0),
        ..task("g1", &[])
    })
    .unwrap();
    submit(&mut s, "c1");
    s.schedule();
    assert_eq!(sent(&mut rx), ["StopActor(\"a1\")", "run c1"]);
    assert_eq!(s.tasks["g1"].state, TaskState::Pending);
    // Another incarnation's end frees nothing; this one's does.
    s.actor_reported("a1", &node, inc + 1, false, 0, "exited");
    s.schedule();
    assert!(sent(&mut rx).is_empty());
    s.actor_reported("a1", &node, inc, false, 0, "exited");
    assert!(s.actor("a1").unwrap().exited);
    s.schedule();
    assert_eq!(sent(&mut rx), ["run g1"]);
    assert!(s.nodes[&node].cancelled_gpus.is_empty());
}

/// A job's end holds the GPUs of its running tasks and actors until its node reports
/// their workers gone: the next job's GPU task waits for them.
#[test]
fn a_stopped_jobs_gpus_wait_for_its_workers_to_end() {
    let mut s = State::default();
    s.add_job(job("j"));
    let mut rx = join_gpu_node(&mut s, cpus(2.0).with_gpus(1.0));
    let node = s.nodes.keys().next().unwrap().clone();
    let gpu_task = |job: &str, id: &str| TaskSpec {
        job_id: job.into(),
        resources: cpus(1.0).with_gpus(0.5),
        ..task(id, &[])
    };
    s.submit(gpu_task("j", "g1")).unwrap();
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "a1".into(),
        resources: cpus(1.0).with_gpus(0.5),
        ..Default::default()
    })
    .unwrap();
    s.schedule();
    let inc = s.actors["a1"].incarnation;
    s.actor_reported("a1", &node, inc, true, 42, "");
    sent(&mut rx);
    s.finish_job("j", JobState::Stopped, -1, "stopped");
    s.add_job(job("k"));
    s.submit(TaskSpec {
        resources: cpus(1.0).with_gpus(1.0),
        ..gpu_task("k", "k1")
    })
    .unwrap();
    s.schedule();
    assert_eq!(s.tasks["k1"].state, TaskState::Pending);
    assert!(!s.task_reported(system_failure(&node, "g1", 0, "killed")));
    s.schedule();
    assert_eq!(
        s.tasks["k1"].state,
        TaskState::Pending,
        "the actor's half is held"
    );
    s.actor_reported("a1", &node, inc, false, 0, "killed");
    s.schedule();
    assert!(matches!(s.tasks["k1"].state, TaskState::Running { .. }));
    assert!(s.nodes[&node].cancelled_gpus.is_empty());
}

/// An actor killed while its worker started it is stopped again when it reports
/// alive; a node that dies takes its killed actors' processes with it.
#[test]
fn an_actor_killed_while_starting_is_stopped_when_it_reports_alive() {
    let (mut s, mut rx) = one_node(2.0);
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "a1".into(),
        resources: cpus(1.0),
        ..Default::default()
    })
    .unwrap();
    s.schedule();
    sent(&mut rx);
    let inc = s.actors["a1"].incarnation;
    s.kill_actor("a1", "killed by request");
    assert_eq!(sent(&mut rx), ["StopActor(\"a1\")"]);
    s.actor_reported("a1", "n1", inc, true, 42, "");
    assert_eq!(sent(&mut rx), ["StopActor(\"a1\")"]);
    assert!(!s.actor("a1").unwrap().exited);
    s.node_died("n1");
    assert!(s.actor("a1").unwrap().exited);
}

/// The same for a task in a placement group's bundle: the bundle's GPU goes to the
/// group's next task only once the cancelled attempt's end is reported.
#[test]
fn a_cancelled_bundle_tasks_gpu_waits_for_its_worker_to_end() {
    let mut s = State::default();
    s.add_job(job("j"));
    let mut rx = join_gpu_node(&mut s, cpus(2.0).with_gpus(1.0));
    let node = s.nodes.keys().next().unwrap().clone();
    s.create_group("j", "g", Strategy::Pack, vec![cpus(2.0).with_gpus(1.0)])
        .unwrap();
    s.schedule();
    let in_bundle = |id: &str| TaskSpec {
        resources: cpus(1.0).with_gpus(1.0),
        bundle: Some(BundleChoice {
            group: "g".into(),
            index: Some(0),
        }),
        ..task(id, &[])
    };
    s.submit(in_bundle("g1")).unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx), ["run g1"]);
    s.cancel("j", &["g1".into()]);
    s.submit(in_bundle("g2")).unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx), ["cancel g1"]);
    assert_eq!(s.tasks["g2"].state, TaskState::Pending);
    assert_eq!(s.groups["g"].bundles[0].available.num_gpus, 0.0);
    // The killed worker's attempt ended: g2 runs on the bundle's GPU.
    assert!(!s.task_reported(system_failure(&node, "g1", 0, "cancelled")));
    s.schedule();
    assert_eq!(sent(&mut rx), ["run g2"]);
    assert!(s.nodes[&node].cancelled_gpus.is_empty());
}

/// A driver's cancel stops a running task on its node (its CPU goes to the next task)
/// and drops a waiting one; what they make fails as cancelled, a finished task's
/// object stays, and an attempt that still ends well has its output dropped on its
/// node.
#[test]
fn cancelled_tasks_stop_where_they_run_and_free_their_room() {
    let (mut s, mut rx) = one_node(1.0);
    submit(&mut s, "t1");
    submit(&mut s, "t2");
    // Two CPUs: no node of this cluster can run it; it waits on the head.
    s.submit(TaskSpec {
        resources: cpus(2.0),
        ..task("big", &[])
    })
    .unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx)[0], "run t1");
    done(&mut s, "t1", "");
    let next = sent(&mut rx);
    assert!(
        next.iter().any(|c| c == "run t2" || c == "promote t2"),
        "{next:?}"
    );
    // t1 is done (its object stays), t2 runs, `big` waits: cancel all three.
    s.cancel("j", &["t1".into(), "t2".into(), "big".into()]);
    s.schedule();
    assert_eq!(sent(&mut rx), ["cancel t2"]);
    assert!(s.object_status("t1").ready);
    for t in ["t2", "big"] {
        assert_cancelled(&s, t);
    }
    // The node's CPU is free again: the next task runs at once.
    submit(&mut s, "t4");
    s.schedule();
    assert_eq!(sent(&mut rx), ["run t4"]);
    // t2's worker finished before the kill reached it: the head ignores the report and
    // the node drops what it stored.
    assert!(!s.task_reported(report("n1", "t2", 0, 10, "")));
    assert_eq!(sent(&mut rx), ["free t2"]);
    assert_eq!(s.nodes["n1"].stored, 0);
    // Another job's tasks are not this driver's to cancel.
    s.cancel("other", &["t4".into()]);
    assert!(sent(&mut rx).is_empty());
    assert!(s.object_status("t4").error.is_none());
    // Freed, the cancelled tasks and their objects go.
    s.free(&["t2".into(), "big".into()]);
    assert!(!s.tasks.contains_key("t2") && !s.tasks.contains_key("big"));

    // A task another unfinished task reads goes on, unless that reader is cancelled
    // with it.
    submit(&mut s, "m");
    s.submit(task("r", &["m"])).unwrap();
    s.schedule();
    sent(&mut rx);
    s.cancel("j", &["m".into()]);
    assert!(s.object_status("m").error.is_none());
    s.cancel("j", &["m".into(), "r".into()]);
    for t in ["m", "r"] {
        assert_cancelled(&s, t);
    }

    // A group that no unfinished task reads does not keep its members' tasks going
    // (an exchange's map outputs, grouped for reduce tasks that were cancelled).
    submit(&mut s, "m2");
    s.create_object_group("j", "g", vec!["m2".into()]).unwrap();
    s.cancel("j", &["m2".into()]);
    assert_cancelled(&s, "m2");
}

/// A node of 2 CPUs and GPU 0 at `address`, registered and attached.
fn join_one_gpu(s: &mut State, address: &str) -> (String, Commands) {
    let id = s.register_node(NodeRegistration {
        hostname: "h".into(),
        object_address: address.into(),
        total: cpus(2.0).with_gpus(1.0),
        gpu_ids: vec![0],
        ..Default::default()
    });
    let (tx, rx) = mpsc::unbounded_channel();
    s.attach(&id, tx).unwrap();
    (id, rx)
}

fn in_bundle(id: &str, group: &str, index: usize, resources: Resources) -> TaskSpec {
    TaskSpec {
        resources,
        bundle: Some(BundleChoice {
            group: group.into(),
            index: Some(index),
        }),
        ..task(id, &[])
    }
}

/// A group placed again after one of its nodes died leaves what its work on the other
/// nodes holds with that work: the GPU a running task of it uses is not handed to
/// another task until that task ends.
#[test]
fn a_group_placed_again_leaves_its_running_work_its_gpu() {
    let mut s = State::default();
    s.add_job(job("j"));
    let (a, _rx_a) = join_one_gpu(&mut s, "a");
    let (b, mut rx_b) = join_one_gpu(&mut s, "b");
    s.create_group(
        "j",
        "g",
        Strategy::StrictSpread,
        vec![cpus(1.0).with_gpus(1.0); 2],
    )
    .unwrap();
    s.schedule();
    let on_b = s
        .group_status("g")
        .unwrap()
        .bundle_nodes
        .iter()
        .position(|n| n.as_deref() == Some(b.as_str()))
        .unwrap();
    s.submit(in_bundle("t", "g", on_b, cpus(1.0).with_gpus(1.0)))
        .unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx_b), ["run t"]);
    s.node_died(&a);
    // t still runs on b with GPU 0: a task of no group asking for it waits.
    s.submit(TaskSpec {
        resources: cpus(1.0).with_gpus(1.0),
        ..task("u", &[])
    })
    .unwrap();
    s.schedule();
    assert_eq!(s.tasks["u"].state, TaskState::Pending);
    assert_eq!(s.nodes[&b].available.num_gpus, 0.0);
    assert_eq!(
        s.nodes[&b].available.num_cpus, 1.0,
        "b's CPU outside the group"
    );
    // t ends: its GPU and CPU go back to b (the bundle they came from is gone).
    assert!(s.task_reported(report(&b, "t", 0, 0, "")));
    s.schedule();
    assert_eq!(sent(&mut rx_b), ["run u"]);
    assert!(s.task_reported(report(&b, "u", 0, 0, "")));
    assert_eq!(s.nodes[&b].available.num_gpus, 1.0);
    assert_eq!(s.nodes[&b].available.num_cpus, 2.0);
}

/// Removing a group ends its tasks: a running one is cancelled on its node (its GPU
/// held until the node says it ended), a waiting one fails instead of waiting for ever.
#[test]
fn removing_a_group_ends_its_running_and_waiting_tasks() {
    let mut s = State::default();
    s.add_job(job("j"));
    let (n, mut rx) = join_one_gpu(&mut s, "a");
    s.create_group("j", "g", Strategy::Pack, vec![cpus(2.0).with_gpus(1.0)])
        .unwrap();
    s.schedule();
    s.submit(in_bundle("t1", "g", 0, cpus(1.0).with_gpus(1.0)))
        .unwrap();
    s.submit(in_bundle("t2", "g", 0, cpus(1.0).with_gpus(1.0)))
        .unwrap();
    s.schedule();
    assert_eq!(sent(&mut rx), ["run t1"]);
    s.remove_group("g");
    assert_eq!(sent(&mut rx), ["cancel t1"]);
    for t in ["t1", "t2"] {
        assert_eq!(s.tasks[t].state, TaskState::Failed, "{t}");
        let error = s.objects[t].error.as_ref().unwrap();
        assert!(
            error.message.contains("placement group g was removed"),
            "{t}"
        );
    }
    // The node has its CPUs back; its GPU once the cancelled attempt ended.
    assert_eq!(s.nodes[&n].available.num_cpus, 2.0);
    assert_eq!(s.nodes[&n].available.num_gpus, 0.0);
    assert!(!s.task_reported(system_failure(&n, "t1", 0, "cancelled")));
    assert_eq!(s.nodes[&n].available.num_gpus, 1.0);
}

/// Work that no bundle of its group could ever hold is refused when it comes.
#[test]
fn work_that_no_bundle_holds_is_refused() {
    let mut s = State::default();
    s.add_job(job("j"));
    let _node = join(&mut s, 4.0, "a");
    s.create_group("j", "g", Strategy::Pack, vec![cpus(1.0), cpus(2.0)])
        .unwrap();
    s.schedule();
    for (spec, want) in [
        (in_bundle("a", "g", 5, cpus(1.0)), "there is no bundle 5"),
        (in_bundle("b", "g", 0, cpus(2.0)), "more than bundle 0"),
        (
            TaskSpec {
                resources: cpus(3.0),
                bundle: Some(BundleChoice {
                    group: "g".into(),
                    index: None,
                }),
                ..task("c", &[])
            },
            "more than any bundle",
        ),
        (
            in_bundle("d", "nope", 0, cpus(1.0)),
            "no placement group nope",
        ),
    ] {
        let e = s.submit(spec).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert!(s.submit(in_bundle("ok", "g", 1, cpus(2.0))).is_ok());
    let actor = ActorSpec {
        job_id: "j".into(),
        actor_id: "x".into(),
        name: "Big".into(),
        resources: cpus(3.0),
        bundle: Some(BundleChoice {
            group: "g".into(),
            index: Some(1),
        }),
        ..Default::default()
    };
    let e = s.create_actor(actor).unwrap_err().to_string();
    assert!(
        e.contains("actor Big") && e.contains("more than bundle 1"),
        "{e}"
    );
}

/// An actor call's output lost with its node is not made again by running the call
/// again on the restarted actor (it changed the actor's state once already): its
/// readers fail naming the call.
#[test]
fn a_lost_actor_call_output_is_not_made_again() {
    let mut s = State::default();
    s.add_job(job("j"));
    let (n1, mut rx1) = join(&mut s, 2.0, "a");
    s.create_actor(ActorSpec {
        job_id: "j".into(),
        actor_id: "a1".into(),
        resources: cpus(1.0),
        max_restarts: 1,
        ..Default::default()
    })
    .unwrap();
    s.schedule();
    let incarnation = s.actors["a1"].incarnation;
    s.actor_reported("a1", &n1, incarnation, true, 42, "");
    s.submit(TaskSpec {
        actor: Some("a1".into()),
        resources: cpus(0.0),
        ..task("c1", &[])
    })
    .unwrap();
    s.schedule();
    sent(&mut rx1);
    assert!(s.task_reported(report(&n1, "c1", 0, 10, "")));
    s.node_died(&n1);
    assert_ne!(s.tasks["c1"].state, TaskState::Pending, "not run again");
    let e = s.object_status("c1").error.unwrap().message;
    assert!(e.contains("a call of actor a1"), "{e}");
}
