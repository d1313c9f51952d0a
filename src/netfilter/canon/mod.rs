//! Rule specs in the form the kernel will hold them.
//!
//! `iptables-save` prints a rule in one canonical spelling (`-p tcp -m tcp --dport 80`,
//! `-s 10.0.0.1/32`, long options shortened, host bits cleared…), and that is what the guard
//! reads back. A config rule spelled otherwise would never compare equal: a `contains` chain would
//! get it appended again and again. So before anything is written, the real iptables of the
//! backend in use prints every configured rule: each rule goes into a chain of its own in a
//! scratch network namespace ([`super::scratch`]), and what `iptables-save` prints there is the
//! form the guard compares and writes. iptables is the only faithful printer of its own rules (every
//! match and target extension has its own save format), so none is re-implemented here.
//!
//! A rule is refused, with what iptables printed, when it cannot be made canonical: iptables
//! refuses it, it becomes several rules (`-s 10.0.0.1,10.0.0.2`), or its printed form prints
//! differently again. Results are cached per backend, table and rule, so a reload with the same
//! rules costs nothing. Where no scratch namespace can be made, only iptables' own options are put
//! in printed form ([`base`]) and the rest is compared as written (said once, at `warn`).

mod base;
mod print;

use super::model::{ipset_family, DesiredChain, DesiredSet, TableId};
use super::rulespec::RuleSpec;
use super::tools::{Backend, BackendChoice, Detected, Tools};
use crate::model::Family;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

/// Where a rule spec sits in `spec.chains`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// `spec.chains[chain].rules[rule]`
    Rule { chain: usize, rule: usize },
    /// `spec.chains[chain].jumps[jump].rule`
    Jump { chain: usize, jump: usize },
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::Rule { chain, rule } => write!(f, "spec.chains[{chain}].rules[{rule}]"),
            Site::Jump { chain, jump } => write!(f, "spec.chains[{chain}].jumps[{jump}].rule"),
        }
    }
}

/// What iptables makes of one rule spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Form {
    /// The form `iptables-save` prints (the rule itself when already written that way).
    Printed(RuleSpec),
    /// Cannot be made canonical; the message says why, with what iptables printed.
    Refused(String),
}

/// A rule the config spells otherwise than iptables prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewritten {
    pub site: Site,
    pub chain: String,
    pub written: RuleSpec,
    pub printed: RuleSpec,
}

/// A rule that cannot be made canonical.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub site: Site,
    pub chain: String,
    pub rule: RuleSpec,
    pub why: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (chain `{}`): `{}`: {}",
            self.site, self.chain, self.rule, self.why
        )
    }
}

/// The chains of a config with their rules in printed form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Canonical {
    pub chains: Vec<DesiredChain>,
    pub rewritten: Vec<Rewritten>,
    pub refused: Vec<Refusal>,
    /// Why rules are compared as written (no scratch namespace), when they are.
    pub unavailable: Option<String>,
}

/// Finds printed forms and remembers them; cheap to clone (shared by the guard and the reload
/// path, which canonicalises a new config before any of it is applied).
#[derive(Clone, Debug)]
pub struct Canonicaliser {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    choice: BackendChoice,
    detected: tokio::sync::OnceCell<Detected>,
    forms: Mutex<HashMap<(Backend, TableId, RuleSpec), Form>>,
    /// Why no scratch namespace could be made, once that is known.
    unavailable: Mutex<Option<String>>,
}

impl Canonicaliser {
    pub fn new(choice: BackendChoice) -> Canonicaliser {
        Canonicaliser {
            inner: Arc::new(Inner {
                choice,
                detected: tokio::sync::OnceCell::new(),
                forms: Mutex::new(HashMap::new()),
                unavailable: Mutex::new(None),
            }),
        }
    }

    /// The backend, detected at the first call (`--iptables-backend auto`).
    pub async fn detect<T: Tools>(&self, tools: &T) -> Detected {
        *self
            .inner
            .detected
            .get_or_init(|| super::tools::detect_with(tools, self.inner.choice))
            .await
    }

    pub async fn backend<T: Tools>(&self, tools: &T) -> Backend {
        self.detect(tools).await.backend
    }

    /// The chains with every rule spec in printed form; refused rules are listed (and left as
    /// written in `chains`). `sets` are the configured sets (their type is used for the scratch
    /// copies of sets the rules match on).
    pub async fn canonicalise<T: Tools>(
        &self,
        tools: &T,
        chains: &[DesiredChain],
        sets: &[DesiredSet],
    ) -> Canonical {
        let mut out = Canonical {
            chains: chains.to_vec(),
            ..Canonical::default()
        };
        if chains.is_empty() {
            return out;
        }
        let backend = self.backend(tools).await;
        let by_table = sites_by_table(chains);
        // Known not to work here: not tried again at every reload (Kubernetes mode reloads at
        // every Service change).
        if let Some(why) = self.unavailable() {
            return fallback(chains, &by_table, why);
        }
        for (table, sites) in &by_table {
            let wanted: BTreeSet<RuleSpec> = sites.iter().map(|(_, r)| r.clone()).collect();
            let missing: Vec<RuleSpec> = {
                let forms = lock(&self.inner.forms);
                wanted
                    .into_iter()
                    .filter(|r| !forms.contains_key(&(backend, *table, r.clone())))
                    .collect()
            };
            if !missing.is_empty() {
                let hints = Hints::new(*table, chains, sets);
                match print::print_forms(tools, backend, *table, &missing, &hints).await {
                    Ok(found) => {
                        let mut forms = lock(&self.inner.forms);
                        for (rule, form) in found {
                            forms.insert((backend, *table, rule), form);
                        }
                    }
                    Err(why) => {
                        *lock(&self.inner.unavailable) = Some(why.clone());
                        return fallback(chains, &by_table, why);
                    }
                }
            }
            let forms = lock(&self.inner.forms);
            for (site, rule) in sites {
                let Some(form) = forms.get(&(backend, *table, rule.clone())) else {
                    continue;
                };
                apply(&mut out, *site, rule, form);
            }
        }
        out
    }

    /// Why rule specs are compared as written, if no scratch namespace could be made.
    pub fn unavailable(&self) -> Option<String> {
        lock(&self.inner.unavailable).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every rule spec of the chains (rules and jumps) by the table it goes into.
fn sites_by_table(chains: &[DesiredChain]) -> BTreeMap<TableId, Vec<(Site, RuleSpec)>> {
    let mut out: BTreeMap<TableId, Vec<(Site, RuleSpec)>> = BTreeMap::new();
    for (c, chain) in chains.iter().enumerate() {
        let list = out.entry(chain.key.table_id()).or_default();
        for (r, rule) in chain.rules.iter().enumerate() {
            list.push((Site::Rule { chain: c, rule: r }, rule.clone()));
        }
        for (j, jump) in chain.jumps.iter().enumerate() {
            list.push((Site::Jump { chain: c, jump: j }, jump.rule.clone()));
        }
    }
    out
}

/// Without a scratch namespace: iptables' own options put in printed form ([`base`]), the rest
/// as written.
fn fallback(
    chains: &[DesiredChain],
    by_table: &BTreeMap<TableId, Vec<(Site, RuleSpec)>>,
    why: String,
) -> Canonical {
    let mut out = Canonical {
        chains: chains.to_vec(),
        unavailable: Some(why),
        ..Canonical::default()
    };
    for (site, rule) in by_table.values().flatten() {
        let printed = base::normalise(rule).unwrap_or_else(|| rule.clone());
        apply(&mut out, *site, rule, &Form::Printed(printed));
    }
    out
}

/// Puts one rule's form into the result.
fn apply(out: &mut Canonical, site: Site, rule: &RuleSpec, form: &Form) {
    let c = match site {
        Site::Rule { chain, .. } | Site::Jump { chain, .. } => chain,
    };
    let chain = out.chains[c].name.clone();
    match form {
        Form::Printed(p) if p != rule => {
            let slot = match site {
                Site::Rule { rule, .. } => out.chains[c].rules.get_mut(rule),
                Site::Jump { jump, .. } => out.chains[c].jumps.get_mut(jump).map(|j| &mut j.rule),
            };
            if let Some(slot) = slot {
                *slot = p.clone();
            }
            out.rewritten.push(Rewritten {
                site,
                chain,
                written: rule.clone(),
                printed: p.clone(),
            });
        }
        Form::Printed(_) => {}
        Form::Refused(why) => out.refused.push(Refusal {
            site,
            chain,
            rule: rule.clone(),
            why: why.clone(),
        }),
    }
}

/// What the scratch copy of a table needs besides the rules: chains they jump to and sets they
/// match on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// Chains of this table known to be chains (protected ones): declared in the scratch table.
    pub chains: BTreeSet<String>,
    /// Configured sets: name -> (type, family).
    pub sets: HashMap<String, (String, &'static str)>,
    /// Where the xtables extensions live, to tell a target extension (`-j MASQUERADE`) from a
    /// chain (`-j KUBE-MARK-MASQ`); `None`: unknown, iptables' errors tell.
    pub extensions: Option<std::path::PathBuf>,
}

impl Hints {
    pub fn new(table: TableId, chains: &[DesiredChain], sets: &[DesiredSet]) -> Hints {
        Hints {
            chains: chains
                .iter()
                .filter(|c| c.key.table_id() == table)
                .map(|c| c.key.chain.clone())
                .collect(),
            sets: sets
                .iter()
                .map(|s| {
                    (
                        s.set.clone(),
                        (s.kind.as_str().to_owned(), ipset_family(s.family)),
                    )
                })
                .collect(),
            extensions: extensions_dir(),
        }
    }

    /// Is `target` a target extension (`libxt_TARGET.so` and friends)? `None` when not known.
    pub(super) fn is_extension(&self, target: &str, family: Family) -> Option<bool> {
        let dir = self.extensions.as_ref()?;
        let own = match family {
            Family::Ipv4 => "libipt_",
            Family::Ipv6 => "libip6t_",
        };
        Some(
            ["libxt_", own]
                .iter()
                .any(|p| dir.join(format!("{p}{target}.so")).exists()),
        )
    }
}

/// The xtables extension directory: `XTABLES_LIBDIR`, else the usual places.
fn extensions_dir() -> Option<std::path::PathBuf> {
    let env = std::env::var_os("XTABLES_LIBDIR").map(std::path::PathBuf::from);
    let usual = [
        "/usr/lib/x86_64-linux-gnu/xtables",
        "/usr/lib/aarch64-linux-gnu/xtables",
        "/usr/lib64/xtables",
        "/usr/lib/xtables",
        "/lib/xtables",
    ];
    env.into_iter()
        .chain(usual.iter().map(std::path::PathBuf::from))
        .find(|d| d.join("libxt_standard.so").exists())
}

#[cfg(test)]
mod tests;
