//! A fake of the iptables and ipset tools for unit tests: tables and sets in memory, restore input
//! applied as one transaction (all or nothing), and a small printer that spells a few rules the
//! way iptables-save does (`-s 10.0.0.1` → `-s 10.0.0.1/32`, `-p tcp --dport` → `-p tcp -m tcp
//! --dport`, `-s a,b` → two rules, conntrack's `ESTABLISHED,RELATED` → `RELATED,ESTABLISHED`),
//! so that spelling, fights and failures can be played out without a kernel.

use super::model::{Table, TableId};
use super::parse::{SavedChain, SavedTable};
use super::rulespec::RuleSpec;
use super::tools::{Backend, ScratchError, ScratchRun, ToolError, Tools};
use crate::model::Family;
use crate::nftables::armed::{Armed, Trigger};
use crate::nftables::netlink::NetlinkError;
use crate::nftables::replay::{Image, Msg};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// A set as the fake holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeSet {
    pub kind: String,
    pub family: String,
    pub options: Vec<String>,
    pub members: BTreeSet<String>,
}

/// What happens after each successful restore of netwarden's (a fighter…); returns whether it
/// stays for the next one.
pub type Hook = Box<dyn FnMut(&mut FakeState) -> bool>;

#[derive(Default)]
pub struct FakeState {
    pub tables: BTreeMap<TableId, SavedTable>,
    pub sets: BTreeMap<String, FakeSet>,
    /// Restore inputs applied (iptables), in order.
    pub restores: Vec<String>,
    /// ipset restore inputs applied, in order.
    pub ipset_restores: Vec<String>,
    pub table_reads: usize,
    pub scratch_runs: usize,
    /// The next iptables restore fails with this message.
    pub fail_restore: Option<String>,
    /// Scratch namespaces cannot be made.
    pub no_scratch: bool,
    /// Rules the printer leaves as they are although it would change them (an iptables whose
    /// save output differs from the scratch namespace's).
    pub verbatim: bool,
    pub after_restore: Option<Hook>,
    pub counts: [usize; 2],
    next_pid: u32,
    /// Images: restore input that a replay applies (the chain as it was), when images are
    /// offered at all.
    pub image: Option<String>,
    pub captures: usize,
    /// The generations replays were asked for.
    pub replays: Vec<u32>,
    pub replay_refused: Option<nix::errno::Errno>,
    /// A replay finds the responder put back only some of its images (the chain is back).
    pub replay_partly: bool,
    /// The last arming: at which generation, what.
    pub armed: Option<(Option<u32>, Vec<Trigger>)>,
    /// Images hold rules with xtables extensions (flannel's), and spares are made.
    pub spares: bool,
    /// Spares made: (name, generation).
    pub spares_made: Vec<(String, u32)>,
    /// Spare deletions: (table, spares named).
    pub spares_dropped: Vec<(TableId, Vec<String>)>,
    /// What each replay committed: its images' message counts.
    pub replayed: Vec<Vec<usize>>,
    /// The next replay only is refused with this.
    pub replay_refused_once: Option<nix::errno::Errno>,
    /// Spares are refused with this.
    pub spare_refused: Option<nix::errno::Errno>,
    /// Images are refused for this reason.
    pub capture_unfit: Option<crate::nftables::replay::Unfit>,
}

#[derive(Default)]
pub struct FakeTools {
    /// Shared, so that a test can look at it after the guard that owns the tools is gone.
    pub state: std::rc::Rc<RefCell<FakeState>>,
}

/// Target extensions the fake knows (everything else that is not a verdict is a chain).
const EXTENSIONS: &[&str] = &["MASQUERADE", "DNAT", "SNAT", "MARK", "LOG", "REJECT"];
const VERDICTS: &[&str] = &["ACCEPT", "DROP", "RETURN", "QUEUE"];

impl FakeTools {
    pub fn new() -> FakeTools {
        FakeTools::default()
    }

    /// Runs `f` on the state.
    pub fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.state.borrow_mut())
    }

    /// Applies restore input as another process would (no hooks, not counted).
    pub fn apply(&self, family: Family, input: &str) {
        self.with(|s| s.run(family, input));
    }

    /// The rules of one chain, as printed; `None` when it does not exist.
    pub fn chain(&self, table: TableId, chain: &str) -> Option<Vec<String>> {
        self.with(|s| {
            s.tables
                .get(&table)?
                .chains
                .get(chain)
                .map(|c| c.rules.iter().map(ToString::to_string).collect())
        })
    }
}

/// How the fake iptables prints a rule: the rules it makes of it, or why it refuses it.
pub fn print(rule: &RuleSpec) -> Result<Vec<RuleSpec>, String> {
    let t = rule.tokens();
    if let Some(w) = t.windows(2).find(|w| w[0] == "-m" && w[1] == "bogus") {
        return Err(format!(
            "Couldn't load match `{}':No such file or directory",
            w[1]
        ));
    }
    let mut out: Vec<String> = Vec::new();
    let mut sources = vec![None];
    let mut i = 0;
    while i < t.len() {
        let tok = t[i].as_str();
        match tok {
            "-s" | "--source" if i + 1 < t.len() => {
                sources = t[i + 1].split(',').map(|a| Some(host(a))).collect();
                out.push("@SRC@".into());
                i += 2;
                continue;
            }
            "-d" | "--destination" if i + 1 < t.len() => {
                out.push("-d".into());
                out.push(host(&t[i + 1]));
                i += 2;
                continue;
            }
            "-p" | "--protocol" if i + 1 < t.len() => {
                let proto = t[i + 1].clone();
                out.push("-p".into());
                out.push(proto.clone());
                let ports = t[i + 2..]
                    .first()
                    .is_some_and(|n| n == "--dport" || n == "--sport");
                if ports {
                    out.push("-m".into());
                    out.push(proto);
                }
                i += 2;
                continue;
            }
            // conntrack prints its states in its own order.
            "ESTABLISHED,RELATED" => out.push("RELATED,ESTABLISHED".into()),
            _ => out.push(tok.to_owned()),
        }
        i += 1;
    }
    sources
        .into_iter()
        .map(|s| {
            let mut tokens = Vec::new();
            for tok in &out {
                if tok == "@SRC@" {
                    if let Some(s) = &s {
                        tokens.push("-s".to_owned());
                        tokens.push(s.clone());
                    }
                } else {
                    tokens.push(tok.clone());
                }
            }
            RuleSpec::from_saved(
                &tokens
                    .iter()
                    .map(|t| {
                        if t.contains(' ') {
                            format!("\"{t}\"")
                        } else {
                            t.clone()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .map_err(|e| e.to_string())
        })
        .collect()
}

fn host(a: &str) -> String {
    if a.contains('/') {
        a.to_owned()
    } else if a.contains(':') {
        format!("{a}/128")
    } else {
        format!("{a}/32")
    }
}

impl FakeState {
    /// Applies restore input as another process would (from a hook).
    pub fn run(&mut self, family: Family, input: &str) {
        self.transaction(family, input, false)
            .unwrap_or_else(|e| panic!("fake restore refused {input:?}: {e}"));
    }

    fn pid(&mut self) -> u32 {
        self.next_pid += 1;
        100_000 + self.next_pid
    }

    /// Applies iptables-restore input as one transaction; `scratch`: into a table of its own.
    fn transaction(&mut self, family: Family, input: &str, verbatim: bool) -> Result<(), String> {
        let mut tables = self.tables.clone();
        let mut current: Option<TableId> = None;
        for (n, line) in input.lines().enumerate() {
            let at = |e: String| format!("{e}\nError occurred at line: {}", n + 1);
            if let Some(name) = line.strip_prefix('*') {
                let table = Table::parse(name).ok_or_else(|| at(format!("no table {name}")))?;
                let id = TableId { family, table };
                let t = tables.entry(id).or_default();
                for b in table.builtin_chains() {
                    t.chains
                        .entry((*b).to_owned())
                        .or_insert_with(|| SavedChain {
                            builtin: true,
                            rules: Vec::new(),
                        });
                }
                current = Some(id);
                continue;
            }
            if line == "COMMIT" {
                current = None;
                continue;
            }
            let id = current.ok_or_else(|| at("outside a table".into()))?;
            let t = tables.get_mut(&id).ok_or_else(|| at("no table".into()))?;
            apply_line(t, line, verbatim).map_err(at)?;
        }
        // Jumps must lead to chains that exist (checked at commit, as iptables-nft does).
        for t in tables.values() {
            for c in t.chains.values() {
                for r in &c.rules {
                    if let Some(target) = r.target() {
                        let known = VERDICTS.contains(&target) || EXTENSIONS.contains(&target);
                        if !known && !t.chains.contains_key(target) {
                            let lines = input.lines().count();
                            return Err(format!(
                                "Chain '{target}' does not exist\nError occurred at line: {lines}"
                            ));
                        }
                    }
                }
            }
        }
        self.tables = tables;
        Ok(())
    }
}

fn apply_line(t: &mut SavedTable, line: &str, verbatim: bool) -> Result<(), String> {
    let printed = |spec: &str| -> Result<Vec<RuleSpec>, String> {
        let rule = RuleSpec::from_saved(spec).map_err(|e| e.to_string())?;
        if verbatim {
            Ok(vec![rule])
        } else {
            print(&rule)
        }
    };
    if let Some(decl) = line.strip_prefix(':') {
        let name = decl.split_whitespace().next().unwrap_or_default();
        let c = t.chains.entry(name.to_owned()).or_default();
        c.rules.clear();
        return Ok(());
    }
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
    let exists = t.chains.contains_key(chain);
    match cmd {
        "-A" if exists => {
            let rules = printed(spec)?;
            if let Some(c) = t.chains.get_mut(chain) {
                c.rules.extend(rules);
            }
        }
        "-I" if exists => {
            let spec = spec.strip_prefix("1 ").unwrap_or(spec);
            let rules = printed(spec)?;
            if let Some(c) = t.chains.get_mut(chain) {
                for (i, r) in rules.into_iter().enumerate() {
                    c.rules.insert(i, r);
                }
            }
        }
        "-D" if exists => {
            let rule = printed(spec)?.remove(0);
            let c = t.chains.get_mut(chain).ok_or("no chain")?;
            let i =
                c.rules.iter().position(|r| *r == rule).ok_or_else(|| {
                    "Bad rule (does a matching rule exist in that chain?)".to_owned()
                })?;
            c.rules.remove(i);
        }
        "-F" if exists => {
            if let Some(c) = t.chains.get_mut(chain) {
                c.rules.clear();
            }
        }
        "-X" if exists => {
            t.chains.remove(chain);
        }
        _ => return Err(format!("Chain '{chain}' does not exist")),
    }
    Ok(())
}

fn save_text(set: &str, s: &FakeSet) -> String {
    let mut out = format!("create {set} {} family {}", s.kind, s.family);
    for o in &s.options {
        out.push(' ');
        out.push_str(o);
    }
    out.push('\n');
    for m in &s.members {
        out.push_str(&format!("add {set} {m}\n"));
    }
    out
}

fn ipset_line(sets: &mut BTreeMap<String, FakeSet>, line: &str) -> Result<(), String> {
    let mut p = line.split_whitespace();
    match (p.next(), p.next()) {
        (Some("create"), Some(name)) => {
            let kind = p.next().ok_or("no type")?.to_owned();
            let mut family = "inet".to_owned();
            let mut options = Vec::new();
            while let Some(w) = p.next() {
                if w == "family" {
                    family = p.next().ok_or("no family")?.to_owned();
                } else {
                    options.push(w.to_owned());
                }
            }
            let new = FakeSet {
                kind,
                family,
                options,
                members: BTreeSet::new(),
            };
            match sets.get(name) {
                Some(old) if old.kind != new.kind || old.options != new.options => {
                    Err("Set cannot be created: set with the same name already exists".to_string())
                }
                Some(_) => Ok(()),
                None => {
                    sets.insert(name.to_owned(), new);
                    Ok(())
                }
            }
        }
        (Some("add"), Some(name)) => {
            let m = p.next().ok_or("no member")?;
            let set = sets
                .get_mut(name)
                .ok_or("The set with the given name does not exist")?;
            set.members.insert(m.to_owned());
            Ok(())
        }
        (Some("del"), Some(name)) => {
            let m = p.next().ok_or("no member")?;
            let set = sets
                .get_mut(name)
                .ok_or("The set with the given name does not exist")?;
            set.members.remove(m);
            Ok(())
        }
        _ => Err(format!("unknown line {line}")),
    }
}

fn failed(program: &str, stderr: String) -> ToolError {
    ToolError::Failed {
        program: program.to_owned(),
        args: String::new(),
        status: "exit status: 1".into(),
        stderr,
    }
}

impl Tools for FakeTools {
    fn capture_chain(
        &self,
        _backend: Backend,
        _table: TableId,
        _chain: &str,
        _rules: usize,
        _jumps: &[(String, bool)],
    ) -> Result<Option<Image>, NetlinkError> {
        self.with(|s| {
            s.captures += 1;
            if let Some(why) = s.capture_unfit.clone() {
                return Err(why.into());
            }
            let image = match s.spares {
                true => crate::nftables::spare::build_for_tests::flannel(),
                false => Image::of_chain(Msg::default(), Vec::new(), Vec::new()),
            };
            Ok(s.image.as_ref().map(|_| image))
        })
    }

    fn make_spare(
        &self,
        _backend: Backend,
        _table: TableId,
        spare: &str,
        _build: &Image,
        genid: u32,
    ) -> Result<Option<(u64, u32)>, NetlinkError> {
        self.with(|s| {
            if !s.spares {
                return Ok(None);
            }
            if let Some(e) = s.spare_refused {
                return Err(NetlinkError::Refused(e));
            }
            s.spares_made.push((spare.to_owned(), genid));
            Ok(Some((77, 4242)))
        })
    }

    fn drop_spares(
        &self,
        _backend: Backend,
        table: TableId,
        names: &[String],
    ) -> Result<Option<u32>, NetlinkError> {
        self.with(|s| s.spares_dropped.push((table, names.to_vec())));
        Ok(None)
    }

    fn replay(&self, images: &[&Image], genid: u32) -> Result<u32, NetlinkError> {
        self.with(|s| {
            s.replays.push(genid);
            s.replayed.push(images.iter().map(|i| i.len()).collect());
            if let Some(e) = s.replay_refused.or(s.replay_refused_once.take()) {
                return Err(NetlinkError::Refused(e));
            }
            let input = s.image.clone().unwrap_or_default();
            s.run(Family::Ipv4, &input);
            if s.replay_partly {
                return Err(NetlinkError::PartlyReplayed);
            }
            Ok(31337)
        })
    }

    fn arm(&self, _owner: u64, at_gen: Option<u32>, armed: Vec<Armed>) {
        self.with(|s| s.armed = Some((at_gen, armed.into_iter().map(|a| a.trigger).collect())));
    }

    async fn save_table(
        &self,
        _backend: Backend,
        table: TableId,
    ) -> Result<Option<SavedTable>, ToolError> {
        Ok(self.with(|s| {
            s.table_reads += 1;
            s.tables.get(&table).cloned()
        }))
    }

    async fn restore(
        &self,
        _backend: Backend,
        family: Family,
        input: &str,
    ) -> Result<Option<u32>, ToolError> {
        let mut hook = {
            let mut s = self.state.borrow_mut();
            if let Some(e) = s.fail_restore.take() {
                return Err(failed("iptables-restore", e));
            }
            let verbatim = s.verbatim;
            s.transaction(family, input, verbatim)
                .map_err(|e| failed("iptables-restore", e))?;
            s.restores.push(input.to_owned());
            s.after_restore.take()
        };
        let pid = self.with(|s| {
            let keep = hook.as_mut().is_some_and(|h| h(s));
            if keep {
                s.after_restore = hook;
            }
            s.pid()
        });
        Ok(Some(pid))
    }

    async fn ipset_names(&self) -> Result<HashSet<String>, ToolError> {
        Ok(self.with(|s| s.sets.keys().cloned().collect()))
    }

    async fn ipset_save_text(&self, name: &str) -> Result<Option<String>, ToolError> {
        Ok(self.with(|s| s.sets.get(name).map(|set| save_text(name, set))))
    }

    async fn ipset_restore(&self, input: &str) -> Result<(), ToolError> {
        self.with(|s| {
            let mut sets = s.sets.clone();
            for line in input.lines().filter(|l| !l.trim().is_empty()) {
                ipset_line(&mut sets, line).map_err(|e| failed("ipset", e))?;
            }
            s.sets = sets;
            s.ipset_restores.push(input.to_owned());
            Ok(())
        })
    }

    async fn count_rules(&self, backend: Backend, _family: Family) -> Option<usize> {
        Some(self.with(|s| match backend {
            Backend::Nft => s.counts[0],
            Backend::Legacy => s.counts[1],
        }))
    }

    async fn scratch(&self, _backend: Backend, job: &ScratchRun) -> Result<String, ScratchError> {
        let mut s = self.state.borrow_mut();
        if s.no_scratch {
            return Err(ScratchError::Unavailable(
                "no scratch namespace in this test".into(),
            ));
        }
        s.scratch_runs += 1;
        let mut scratch = FakeState::default();
        for (name, _, _) in &job.sets {
            scratch.sets.insert(name.clone(), FakeSet::default());
        }
        // Rules matching on sets the scratch run did not create are refused, as ipset would.
        for line in job.input.lines() {
            let rule = line.splitn(3, ' ').nth(2).unwrap_or_default();
            if let Some(set) = rule
                .split_whitespace()
                .skip_while(|t| *t != "--match-set")
                .nth(1)
            {
                if !scratch.sets.contains_key(set) {
                    return Err(ScratchError::Refused(format!(
                        "iptables-restore v1.8.9 (nf_tables): Set {set} doesn't exist.\n\nError occurred at line: 2"
                    )));
                }
            }
        }
        scratch
            .transaction(job.table.family, &job.input, false)
            .map_err(|e| {
                ScratchError::Refused(format!("iptables-restore v1.8.9 (nf_tables): {e}"))
            })?;
        Ok(render_save(&scratch.tables, job.table))
    }
}

/// `iptables-save -t TABLE` text of a fake table.
pub fn render_save(tables: &BTreeMap<TableId, SavedTable>, id: TableId) -> String {
    let mut out = format!("*{}\n", id.table);
    if let Some(t) = tables.get(&id) {
        for (name, c) in &t.chains {
            let policy = if c.builtin { "ACCEPT" } else { "-" };
            out.push_str(&format!(":{name} {policy} [0:0]\n"));
        }
        for (name, c) in &t.chains {
            for r in &c.rules {
                out.push_str(&format!("-A {name} {r}\n"));
            }
        }
    }
    out.push_str("COMMIT\n");
    out
}
