//! Printing rule specs in a scratch namespace: each rule in a chain of its own, the chains they
//! jump to declared and the sets they match on created; what iptables names as missing is added
//! and the run repeated, a rule it refuses is set aside (by the line it names, else by halving
//! the batch) so that the rest still gets printed.

use super::{Form, Hints};
use crate::netfilter::model::{ipset_family, TableId};
use crate::netfilter::parse;
use crate::netfilter::rulespec::RuleSpec;
use crate::netfilter::tools::{Backend, ScratchError, ScratchRun, Tools};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The chain each scratch rule goes into: `NW-RULE-<index>`.
const SCRATCH_PREFIX: &str = "NW-RULE-";
/// Restore runs for one batch of rules at most (a missing chain or set, a refused rule, each
/// costs a run).
const MAX_RUNS: usize = 24;

/// Verdicts every chain knows; not chains to declare.
const VERDICTS: &[&str] = &["ACCEPT", "DROP", "RETURN", "QUEUE", "CONTINUE"];

/// What scratch runs need to know about the table at hand; grows as iptables names what is
/// missing.
struct Scratch<'a> {
    table: TableId,
    chains: BTreeSet<String>,
    sets: BTreeMap<String, (String, &'static str)>,
    hints: &'a Hints,
}

impl<'a> Scratch<'a> {
    fn new(table: TableId, rules: &[RuleSpec], hints: &'a Hints) -> Scratch<'a> {
        let mut s = Scratch {
            table,
            chains: BTreeSet::new(),
            sets: BTreeMap::new(),
            hints,
        };
        for r in rules {
            s.prepare(r);
        }
        s
    }

    /// Declares the chains `rule` jumps to and creates the sets it matches on.
    fn prepare(&mut self, rule: &RuleSpec) {
        if let Some(t) = rule.target() {
            let chain = !VERDICTS.contains(&t)
                && (self.hints.chains.contains(t)
                    || self.hints.is_extension(t, self.table.family) == Some(false));
            if chain && crate::netfilter::model::valid_chain_name(t).is_ok() {
                self.chains.insert(t.to_owned());
            }
        }
        for (name, dims) in set_refs(rule) {
            self.add_set(&name, dims);
        }
    }

    fn add_set(&mut self, name: &str, dims: usize) -> bool {
        if self.sets.contains_key(name) || crate::netfilter::model::valid_set_name(name).is_err() {
            return false;
        }
        let family = ipset_family(self.table.family);
        let kind = match self.hints.sets.get(name) {
            Some(k) => k.clone(),
            // The printed form does not depend on the type; the dimension must fit the flags.
            None => (
                match dims {
                    0 | 1 => "hash:ip",
                    2 => "hash:ip,port",
                    _ => "hash:ip,port,ip",
                }
                .to_owned(),
                family,
            ),
        };
        self.sets.insert(name.to_owned(), kind);
        true
    }

    fn run(&self, rules: &[RuleSpec]) -> (ScratchRun, usize) {
        let (input, first) = scratch_input(self.table, rules, &self.chains);
        let sets = self
            .sets
            .iter()
            .map(|(n, (k, f))| (n.clone(), k.clone(), *f))
            .collect();
        (
            ScratchRun {
                table: self.table,
                sets,
                input,
            },
            first,
        )
    }

    /// Learns from a refusal what was missing; true when a retry may succeed.
    fn learn(&mut self, message: &str) -> bool {
        if let Some(chain) = missing_chain(message) {
            if !self.chains.contains(&chain)
                && crate::netfilter::model::valid_chain_name(&chain).is_ok()
            {
                self.chains.insert(chain);
                return true;
            }
        }
        if let Some(set) = missing_set(message) {
            return self.add_set(&set, 1);
        }
        false
    }
}

/// The printed form of each of `rules` (two passes: printed, then the printed forms printed
/// again, which must not change). `Err`: no scratch namespace.
pub(super) async fn print_forms<T: Tools>(
    tools: &T,
    backend: Backend,
    table: TableId,
    rules: &[RuleSpec],
    hints: &Hints,
) -> Result<Vec<(RuleSpec, Form)>, String> {
    let mut scratch = Scratch::new(table, rules, hints);
    let first = print_batch(tools, backend, &mut scratch, rules).await?;
    let changed: Vec<RuleSpec> = first
        .iter()
        .filter_map(|(r, f)| match f {
            Form::Printed(p) if p != r => Some(p.clone()),
            _ => None,
        })
        .collect();
    let again: HashMap<RuleSpec, Form> = if changed.is_empty() {
        HashMap::new()
    } else {
        print_batch(tools, backend, &mut scratch, &changed)
            .await?
            .into_iter()
            .collect()
    };
    Ok(first
        .into_iter()
        .map(|(rule, form)| {
            let form = match form {
                Form::Printed(p) if p != rule => stable(&p, again.get(&p)),
                f => f,
            };
            (rule, form)
        })
        .collect())
}

/// A printed form that prints as itself again is canonical.
fn stable(printed: &RuleSpec, again: Option<&Form>) -> Form {
    match again {
        Some(Form::Printed(q)) if q == printed => Form::Printed(printed.clone()),
        Some(Form::Printed(q)) => Form::Refused(format!(
            "iptables prints it as `{printed}`, and that as `{q}`: no form of it reads back as written"
        )),
        Some(Form::Refused(why)) => Form::Refused(format!(
            "iptables prints it as `{printed}`, which it then refuses: {why}"
        )),
        None => Form::Refused(format!("iptables prints it as `{printed}`, which could not be checked")),
    }
}

/// One batch of rules through scratch runs, learning missing chains and sets and setting aside
/// refused rules until the rest goes through.
async fn print_batch<T: Tools>(
    tools: &T,
    backend: Backend,
    scratch: &mut Scratch<'_>,
    rules: &[RuleSpec],
) -> Result<Vec<(RuleSpec, Form)>, String> {
    let mut out: Vec<(RuleSpec, Form)> = Vec::new();
    // Batches still to print; a refusal that names no line splits its batch in two.
    let mut todo: Vec<Vec<RuleSpec>> = vec![rules.to_vec()];
    let mut runs = 0;
    while let Some(batch) = todo.pop() {
        if batch.is_empty() {
            continue;
        }
        runs += 1;
        if runs > MAX_RUNS {
            out.extend(batch.into_iter().map(|r| {
                (
                    r,
                    Form::Refused("could not be checked: too many refusals in one config".into()),
                )
            }));
            continue;
        }
        let (job, first_line) = scratch.run(&batch);
        match tools.scratch(backend, &job).await {
            Ok(text) => out.extend(read_back(&text, scratch.table, &batch)),
            Err(ScratchError::Unavailable(why)) => return Err(why),
            Err(ScratchError::Refused(message)) => {
                if scratch.learn(&message) {
                    todo.push(batch);
                    continue;
                }
                let why = format!("iptables refuses it: {}", first_message(&message));
                let at = error_line(&message)
                    .and_then(|l| l.checked_sub(first_line))
                    .filter(|i| *i < batch.len());
                match at {
                    Some(i) => {
                        let mut rest = batch;
                        let bad = rest.remove(i);
                        out.push((bad, Form::Refused(why)));
                        todo.push(rest);
                    }
                    None if batch.len() == 1 => {
                        out.extend(batch.into_iter().map(|r| (r, Form::Refused(why.clone()))));
                    }
                    None => {
                        let mut a = batch;
                        let b = a.split_off(a.len() / 2);
                        todo.push(a);
                        todo.push(b);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Restore input with each rule in a chain of its own, and the line of the first rule.
pub(super) fn scratch_input(
    table: TableId,
    rules: &[RuleSpec],
    chains: &BTreeSet<String>,
) -> (String, usize) {
    use std::fmt::Write;
    let mut s = format!("*{}\n", table.table);
    for i in 0..rules.len() {
        let _ = writeln!(s, ":{SCRATCH_PREFIX}{i} - [0:0]");
    }
    for c in chains {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    let first = 2 + rules.len() + chains.len();
    for (i, r) in rules.iter().enumerate() {
        let _ = writeln!(s, "-A {SCRATCH_PREFIX}{i} {r}");
    }
    s.push_str("COMMIT\n");
    (s, first)
}

/// The printed form of each rule from the scratch table's `iptables-save` output.
fn read_back(text: &str, table: TableId, rules: &[RuleSpec]) -> Vec<(RuleSpec, Form)> {
    let saved = parse::iptables_save(text)
        .ok()
        .and_then(|mut t| t.remove(table.table.as_str()));
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let printed = saved
                .as_ref()
                .and_then(|t| t.chains.get(&format!("{SCRATCH_PREFIX}{i}")))
                .map(|c| c.rules.clone())
                .unwrap_or_default();
            (rule.clone(), classify(printed))
        })
        .collect()
}

fn classify(mut printed: Vec<RuleSpec>) -> Form {
    match printed.len() {
        1 => Form::Printed(printed.remove(0)),
        0 => Form::Refused("iptables accepted it but holds no rule for it".into()),
        n => Form::Refused(format!(
            "iptables makes {n} rules of it ({}): write one rule per entry",
            printed
                .iter()
                .map(|r| format!("`{r}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The sets a rule matches on, with the number of flags (`src,dst`: 2).
pub(super) fn set_refs(rule: &RuleSpec) -> Vec<(String, usize)> {
    let t = rule.tokens();
    t.windows(2)
        .enumerate()
        .filter(|(_, w)| w[0] == "--match-set" || w[0] == "--set")
        .map(|(i, w)| {
            let dims = t.get(i + 2).map_or(1, |f| f.split(',').count());
            (w[1].clone(), dims)
        })
        .collect()
}

/// `Chain 'X' does not exist` (iptables-nft) or ``Couldn't load target `X'`` (legacy).
pub(super) fn missing_chain(message: &str) -> Option<String> {
    between(message, "Chain '", "' does not exist")
        .or_else(|| between(message, "Couldn't load target `", "'"))
}

/// `Set X doesn't exist.`
pub(super) fn missing_set(message: &str) -> Option<String> {
    between(message, "Set ", " doesn't exist")
}

fn between(message: &str, before: &str, after: &str) -> Option<String> {
    let start = message.find(before)? + before.len();
    let len = message[start..].find(after)?;
    let name = &message[start..start + len];
    (!name.is_empty() && !name.contains(char::is_whitespace)).then(|| name.to_owned())
}

/// `Error occurred at line: N`.
pub(super) fn error_line(message: &str) -> Option<usize> {
    let at = message.find("Error occurred at line: ")? + "Error occurred at line: ".len();
    message[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The tool's first line, without its `iptables-restore v1.8.9 (nf_tables): ` prefix.
pub(super) fn first_message(message: &str) -> String {
    let line = message.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let line = match line.find("): ") {
        Some(i) if line.contains("tables") => &line[i + 3..],
        _ => line,
    };
    line.trim().chars().take(300).collect()
}
