//! A driver's session with the head: calls that wait out a head restart, and what the
//! driver replays to the head that comes back.
//!
//! A head keeps its jobs across a restart but not their tasks and objects: those live in
//! the drivers that submitted them and on the nodes that hold them. So a driver keeps a
//! [`Ledger`] of what it told the head about its job that it still needs (tasks,
//! object groups and objects it put, in order, with the freed ones that live ones
//! read), and names the head incarnation it spoke to on every call
//! ([`super::auth::HEAD_HEADER`]). A call that finds the head gone waits for it (up to
//! the session's patience); a call that finds a new head replays the ledger first. The
//! new head takes a replayed task whose object a rejoined node kept as done, and runs
//! the others again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Response, Status};
use volley_common::{Result, VolleyError};

use super::auth::head_restarted;
use super::net::{status_error, unreachable, Channels, Head};
use super::proto;

/// How long a driver waits for a head that went away when nothing says otherwise
/// (`VOLLEY_HEAD_PATIENCE`, in seconds, which a node agent sets for the drivers it
/// starts to its own `--head-patience`).
const DEFAULT_PATIENCE: Duration = Duration::from_secs(60);

/// The head, as one driver's job talks to it.
pub(crate) struct Session {
    job_id: String,
    /// Names [`Self::incarnation`] on every call.
    head: Head,
    /// Names none: to find out which head answers, and to replay to it.
    plain: Head,
    incarnation: Arc<AtomicU64>,
    /// Replays done so far.
    replayed: AtomicU64,
    replaying: tokio::sync::Mutex<()>,
    patience: Duration,
    ledger: Mutex<Ledger>,
    /// Why the head no longer runs this job (stopped, judged dead, ended), once a call
    /// learned it: every later call fails at once, saying so.
    ended: std::sync::OnceLock<String>,
}

impl Session {
    /// A session of job `job_id` with the head at `address`; the first call to the
    /// head ([`Self::hello`]) learns its incarnation.
    pub fn new(channels: &Channels, address: &str, job_id: &str) -> Result<Self> {
        let incarnation = Arc::new(AtomicU64::new(0));
        let patience = match volley_common::env_var("VOLLEY_HEAD_PATIENCE")? {
            Some(s) => s
                .parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| {
                    VolleyError::Config(format!(
                        "VOLLEY_HEAD_PATIENCE={s:?} is not a number of seconds"
                    ))
                })?,
            None => DEFAULT_PATIENCE,
        };
        Ok(Self {
            job_id: job_id.to_string(),
            head: channels.head_naming(address, Arc::clone(&incarnation))?,
            plain: channels.head(address)?,
            incarnation,
            replayed: AtomicU64::new(0),
            replaying: tokio::sync::Mutex::new(()),
            patience,
            ledger: Mutex::default(),
            ended: std::sync::OnceLock::new(),
        })
    }

    /// Learns which head answers (waiting for one, as any call does). A driver that
    /// starts has told no head anything: its (empty) replay is over, so a head that
    /// restarted lets go of what it kept for an earlier driver of the job.
    pub async fn hello(&self) -> Result<()> {
        let reply = self
            .call("joining the job", |mut h, job| async move {
                h.driver_alive(proto::DriverHeartbeat {
                    job_id: job,
                    replayed: true,
                })
                .await
            })
            .await?;
        self.incarnation.store(reply.head, Ordering::SeqCst);
        Ok(())
    }

    /// Calls the head with `f` (given a client and this job's id), waiting out a head
    /// that is away and replaying the ledger to a head that restarted, for up to the
    /// session's patience; `what` names the call in errors.
    pub async fn call<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut(Head, String) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let start = Instant::now();
        loop {
            if let Some(why) = self.ended.get() {
                return Err(VolleyError::execution(format!("{what}: {why}")));
            }
            let seen = self.replayed.load(Ordering::SeqCst);
            match f(self.head.clone(), self.job_id.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(e) if away(&e) && start.elapsed() < self.patience => {
                    self.recover(seen)
                        .await
                        .map_err(|e| status_error(what, e))?;
                }
                Err(e) if away(&e) => {
                    return Err(status_error(
                        format!(
                            "{what} (the head did not come back within {:?})",
                            self.patience
                        ),
                        e,
                    ))
                }
                // Refused: maybe because the job no longer runs (its groups, actors
                // and objects went with it); then that is the reason to give.
                Err(e) if refused(&e) && self.job_ended().await => continue,
                Err(e) => return Err(status_error(what, e)),
            }
        }
    }

    /// Whether a call learned that the head no longer runs this job.
    pub fn has_ended(&self) -> bool {
        self.ended.get().is_some()
    }

    /// Whether the head no longer runs this job (asked now, unless known already);
    /// the first time it is learned, the program hears it on its stderr.
    pub async fn job_ended(&self) -> bool {
        if self.ended.get().is_some() {
            return true;
        }
        let mut plain = self.plain.clone();
        let heartbeat = proto::DriverHeartbeat {
            job_id: self.job_id.clone(),
            replayed: false,
        };
        match plain.driver_alive(heartbeat).await {
            Err(e) if refused(&e) => {
                let why = format!(
                    "job {} no longer runs on the cluster ({})",
                    self.job_id,
                    e.message()
                );
                if self.ended.set(why.clone()).is_ok() {
                    eprintln!("[volley] {why}: this program's calls to it fail from now on");
                }
                true
            }
            _ => false,
        }
    }

    /// After a call failed (with `seen` replays done then): waits a moment if the head
    /// is away; replays the ledger to a head that restarted, unless another call did
    /// since.
    async fn recover(&self, seen: u64) -> std::result::Result<(), Status> {
        let _one = self.replaying.lock().await;
        if self.replayed.load(Ordering::SeqCst) != seen {
            return Ok(());
        }
        let mut plain = self.plain.clone();
        let reply = match plain
            .driver_alive(proto::DriverHeartbeat {
                job_id: self.job_id.clone(),
                replayed: false,
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) if away(&e) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if reply.head == self.incarnation.load(Ordering::SeqCst) || reply.recovering {
            // The same head: the call failed on the way; or a new one still waiting for
            // the nodes it had to rejoin (what they kept is found then, not made
            // again). Try again after a moment.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Ok(());
        }
        // Should the head go away again on the way, the next call replays it all again
        // (the head takes a replayed item it knows as known).
        match self.replay(&mut plain).await {
            Err(e) if away(&e) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                return Ok(());
            }
            other => other?,
        }
        self.incarnation.store(reply.head, Ordering::SeqCst);
        self.replayed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Tells a new head what the ledger holds: the objects put (they read nothing),
    /// the placement groups and the actors (tasks run in the ones and call the others),
    /// then the tasks and object groups in order, then which of them the driver freed;
    /// then that the replay is over (objects and actors kept for the job that nothing
    /// claimed go).
    async fn replay(&self, plain: &mut Head) -> std::result::Result<(), Status> {
        let Replay {
            items,
            puts,
            placement_groups,
            actors,
            freed,
        } = self.ledger.lock().expect("ledger lock").replay();
        tracing::info!(
            "job {}: the head restarted; telling it again of {} tasks and groups, {} \
             objects put, {} placement groups and {} actors",
            self.job_id,
            items.len(),
            puts.len(),
            placement_groups.len(),
            actors.len()
        );
        // One the new head refuses is refused again when used, saying why.
        for group in placement_groups {
            if let Err(e) = plain.create_placement_group(group).await {
                if away(&e) {
                    return Err(e);
                }
            }
        }
        for actor in actors {
            if let Err(e) = plain.create_actor(actor).await {
                if away(&e) {
                    return Err(e);
                }
            }
        }
        for put in puts {
            // An object put on a node that did not come back is lost: reading it fails
            // then, saying so.
            if let Err(e) = plain.put_object(put).await {
                if away(&e) {
                    return Err(e);
                }
            }
        }
        for chunk in items.chunks(1024) {
            plain
                .submit_tasks(proto::SubmitTasksRequest {
                    items: chunk.to_vec(),
                })
                .await?;
        }
        if !freed.is_empty() {
            plain
                .free(proto::FreeRequest {
                    job_id: self.job_id.clone(),
                    object_ids: freed,
                })
                .await?;
        }
        plain
            .driver_alive(proto::DriverHeartbeat {
                job_id: self.job_id.clone(),
                replayed: true,
            })
            .await?;
        Ok(())
    }

    /// Notes a submission (a task or an object group) the head is told of.
    pub fn note_submission(&self, item: &proto::Submission) {
        use proto::submission::Item;
        let (id, args) = match &item.item {
            Some(Item::Task(t)) => (t.task_id.clone(), t.args.clone()),
            Some(Item::Group(g)) => (g.group_id.clone(), g.object_ids.clone()),
            None => return,
        };
        self.ledger
            .lock()
            .expect("ledger lock")
            .add(id, Kept::Submission(item.clone()), args);
    }

    /// Notes an object put into the cluster.
    pub fn note_put(&self, put: &proto::PutObjectRequest) {
        let mut put = put.clone();
        put.job_id.clone_from(&self.job_id);
        self.ledger
            .lock()
            .expect("ledger lock")
            .add(put.object_id.clone(), Kept::Put(put), vec![]);
    }

    /// Notes an actor created.
    pub fn note_actor(&self, actor: &proto::CreateActorRequest) {
        self.ledger.lock().expect("ledger lock").add(
            actor.actor_id.clone(),
            Kept::Actor(actor.clone()),
            vec![],
        );
    }

    /// Notes a placement group created.
    pub fn note_placement_group(&self, group: &proto::CreatePlacementGroupRequest) {
        self.ledger.lock().expect("ledger lock").add(
            group.group_id.clone(),
            Kept::PlacementGroup(group.clone()),
            vec![],
        );
    }

    /// Notes that the driver removed placement group `group`: the actors in it went
    /// with it.
    pub fn note_placement_group_removed(&self, group: &str) {
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let actors: Vec<String> = ledger
            .entries
            .values()
            .filter_map(|e| match &e.kept {
                Kept::Actor(a) if a.placement_group == group => Some(a.actor_id.clone()),
                _ => None,
            })
            .collect();
        for id in actors.iter().map(String::as_str).chain([group]) {
            ledger.free(id);
        }
    }

    /// Notes that the driver let go of `ids` (objects, actors it killed, placement
    /// groups it removed, or actors and groups the head refused to create).
    pub fn note_freed(&self, ids: &[String]) {
        let mut ledger = self.ledger.lock().expect("ledger lock");
        for id in ids {
            ledger.free(id);
        }
    }

    /// The client that names the head's incarnation, for calls made without
    /// [`Self::call`] (they fail, rather than wait, when the head is away).
    pub fn head(&self) -> Head {
        self.head.clone()
    }
}

/// Whether the head refused a call for what it knows (an unknown or ended job, a
/// group or actor that went), rather than failing to answer.
fn refused(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::NotFound | tonic::Code::FailedPrecondition
    )
}

/// Whether a call failed because the head is away or restarted.
fn away(status: &Status) -> bool {
    unreachable(status) || head_restarted(status)
}

/// What a driver told the head that it may have to tell a restarted head again.
enum Kept {
    Submission(proto::Submission),
    Put(proto::PutObjectRequest),
    Actor(proto::CreateActorRequest),
    PlacementGroup(proto::CreatePlacementGroupRequest),
}

/// What a driver tells a new head, from its [`Ledger`].
#[derive(Default)]
struct Replay {
    /// Tasks and object groups, in order.
    items: Vec<proto::Submission>,
    puts: Vec<proto::PutObjectRequest>,
    placement_groups: Vec<proto::CreatePlacementGroupRequest>,
    actors: Vec<proto::CreateActorRequest>,
    /// The ids among `items` and `puts` to free after.
    freed: Vec<String>,
}

struct Entry {
    kept: Kept,
    /// The objects or groups it reads.
    args: Vec<String>,
    /// Entries kept that read it.
    readers: u32,
    freed: bool,
}

/// A driver's submissions and puts still needed, in order: those whose objects it
/// holds, and those freed that such a one reads (to make a lost input again, the head
/// needs the task that made it). An entry goes once it is freed and no entry kept
/// reads it.
#[derive(Default)]
struct Ledger {
    next: u64,
    entries: BTreeMap<u64, Entry>,
    by_id: HashMap<String, u64>,
}

impl Ledger {
    fn add(&mut self, id: String, kept: Kept, args: Vec<String>) {
        for a in &args {
            if let Some(e) = self.by_id.get(a).and_then(|at| self.entries.get_mut(at)) {
                e.readers += 1;
            }
        }
        self.next += 1;
        self.by_id.insert(id, self.next);
        self.entries.insert(
            self.next,
            Entry {
                kept,
                args,
                readers: 0,
                freed: false,
            },
        );
    }

    fn free(&mut self, id: &str) {
        let Some(&at) = self.by_id.get(id) else {
            return;
        };
        let e = self.entries.get_mut(&at).expect("indexed");
        e.freed = true;
        let mut gone = vec![];
        if e.readers == 0 {
            gone.push(id.to_string());
        }
        while let Some(id) = gone.pop() {
            let Some(at) = self.by_id.remove(&id) else {
                continue;
            };
            let e = self.entries.remove(&at).expect("indexed");
            for a in e.args {
                if let Some(r) = self.by_id.get(&a).and_then(|at| self.entries.get_mut(at)) {
                    r.readers = r.readers.saturating_sub(1);
                    if r.readers == 0 && r.freed {
                        gone.push(a);
                    }
                }
            }
        }
    }

    /// What to tell a new head.
    fn replay(&self) -> Replay {
        let mut r = Replay::default();
        for e in self.entries.values() {
            match &e.kept {
                Kept::Submission(s) => {
                    let mut s = s.clone();
                    // A freed task is lineage only: run again if a reader needs it.
                    if let Some(proto::submission::Item::Task(t)) = &mut s.item {
                        t.made = e.freed;
                    }
                    r.items.push(s);
                }
                Kept::Put(p) => r.puts.push(p.clone()),
                Kept::Actor(a) => r.actors.push(a.clone()),
                Kept::PlacementGroup(g) => r.placement_groups.push(g.clone()),
            }
        }
        r.freed = self
            .by_id
            .iter()
            .filter(|(_, at)| self.entries[at].freed)
            .map(|(id, _)| id.clone())
            .collect();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, args: &[&str]) -> Kept {
        Kept::Submission(proto::Submission {
            item: Some(proto::submission::Item::Task(proto::SubmitTaskRequest {
                task_id: id.into(),
                args: args.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            })),
        })
    }

    fn ids(items: &[proto::Submission]) -> Vec<String> {
        items
            .iter()
            .filter_map(|i| match &i.item {
                Some(proto::submission::Item::Task(t)) => Some(t.task_id.clone()),
                _ => None,
            })
            .collect()
    }

    /// A freed object stays in the ledger while a kept task reads it (a head that
    /// restarted may have to make it again for that task), and goes with its last
    /// reader.
    #[test]
    fn a_freed_entry_stays_while_a_kept_one_reads_it() {
        let mut l = Ledger::default();
        l.add("read".into(), task("read", &[]), vec![]);
        l.add("map".into(), task("map", &["read"]), vec!["read".into()]);
        l.add("other".into(), task("other", &[]), vec![]);
        l.free("read");
        l.free("other");
        let Replay { items, freed, .. } = l.replay();
        assert_eq!(ids(&items), ["read", "map"]);
        assert_eq!(freed, ["read"]);
        // The freed one goes to the head as lineage only.
        let made: Vec<bool> = items
            .iter()
            .filter_map(|i| match &i.item {
                Some(proto::submission::Item::Task(t)) => Some(t.made),
                _ => None,
            })
            .collect();
        assert_eq!(made, [true, false]);
        l.free("map");
        let Replay { items, freed, .. } = l.replay();
        assert!(items.is_empty() && freed.is_empty());
    }

    /// Actors and placement groups are told again until the driver kills or removes
    /// them (no task reads them: they go at once).
    #[test]
    fn actors_and_placement_groups_stay_until_let_go() {
        let mut l = Ledger::default();
        let actor = |id: &str| proto::CreateActorRequest {
            actor_id: id.into(),
            ..Default::default()
        };
        l.add("a1".into(), Kept::Actor(actor("a1")), vec![]);
        l.add("a2".into(), Kept::Actor(actor("a2")), vec![]);
        l.add(
            "pg".into(),
            Kept::PlacementGroup(proto::CreatePlacementGroupRequest {
                group_id: "pg".into(),
                ..Default::default()
            }),
            vec![],
        );
        l.add("call".into(), task("call", &[]), vec![]);
        let r = l.replay();
        let actors: Vec<&str> = r.actors.iter().map(|a| a.actor_id.as_str()).collect();
        assert_eq!(actors, ["a1", "a2"]);
        assert_eq!(r.placement_groups.len(), 1);
        assert_eq!(ids(&r.items), ["call"]);
        l.free("a1");
        l.free("pg");
        let r = l.replay();
        let actors: Vec<&str> = r.actors.iter().map(|a| a.actor_id.as_str()).collect();
        assert_eq!(actors, ["a2"]);
        assert!(r.placement_groups.is_empty() && r.freed.is_empty());
    }

    /// Removing a placement group lets go of the actors that lived in it.
    #[tokio::test]
    async fn a_removed_placement_group_takes_its_actors_out_of_the_ledger() {
        let channels = Channels::new("", &Default::default());
        let session = Session::new(&channels, "127.0.0.1:1", "j").unwrap();
        session.note_placement_group(&proto::CreatePlacementGroupRequest {
            group_id: "pg".into(),
            ..Default::default()
        });
        for (id, group) in [("in", "pg"), ("out", "")] {
            session.note_actor(&proto::CreateActorRequest {
                actor_id: id.into(),
                placement_group: group.into(),
                ..Default::default()
            });
        }
        session.note_placement_group_removed("pg");
        let r = session.ledger.lock().unwrap().replay();
        let actors: Vec<&str> = r.actors.iter().map(|a| a.actor_id.as_str()).collect();
        assert_eq!(actors, ["out"]);
        assert!(r.placement_groups.is_empty());
    }
}
