//! The output of `nft -a -s list table FAMILY NAME` → an observed table. Pure.
//!
//! Text, not `nft -j`: rules are compared as nft prints them (the JSON output carries a rule only
//! as an expression tree, which the config's text cannot be compared with), and nft 1.0.6's
//! JSON leaves out table comments, chain comments and netdev devices and misprints table flags.
//! The listing is nft's own save format (what `nft -f` reads back), one object or rule a line;
//! `-s` leaves out counters and element expiry, `-a` adds `# handle N`.

use super::model::{BaseChain, Element, NfFamily, RuleText, TableKey};
use super::{schema, text};
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ListingError {
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("no `table {0} {{` block in the listing")]
    NoTable(TableKey),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObservedRule {
    pub handle: u64,
    pub text: RuleText,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ObservedChain {
    pub name: String,
    pub handle: Option<u64>,
    pub base: Option<BaseChain>,
    pub comment: Option<String>,
    pub rules: Vec<ObservedRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ObservedSet {
    pub name: String,
    pub handle: Option<u64>,
    pub map: bool,
    /// `type …` or `typeof …`, as printed.
    pub declaration: String,
    pub flags: Vec<String>,
    pub timeout: Option<String>,
    pub comment: Option<String>,
    pub elements: Vec<Element>,
    /// Other lines of the set (`size 65535`, `policy memory`, `auto-merge`, …), kept so that an
    /// adopted set can be recreated as it was.
    pub other: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObservedTable {
    pub key: TableKey,
    pub handle: Option<u64>,
    pub comment: Option<String>,
    pub flags: Vec<String>,
    pub chains: Vec<ObservedChain>,
    pub sets: Vec<ObservedSet>,
}

impl ObservedTable {
    pub fn chain(&self, name: &str) -> Option<&ObservedChain> {
        self.chains.iter().find(|c| c.name == name)
    }

    pub fn set(&self, name: &str) -> Option<&ObservedSet> {
        self.sets.iter().find(|s| s.name == name)
    }

    pub fn dormant(&self) -> bool {
        self.flags.iter().any(|f| f == "dormant")
    }
}

/// `… # handle 12` → (`…`, 12).
fn split_handle(line: &str) -> (&str, Option<u64>) {
    if let Some(at) = line.rfind(" # handle ") {
        let tail = &line[at + " # handle ".len()..];
        if let Ok(h) = tail.trim().parse() {
            return (line[..at].trim_end(), Some(h));
        }
    }
    (line, None)
}

fn quoted(s: &str) -> Option<String> {
    let s = s.trim();
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('"')).then(|| inner.to_owned())
}

/// What ends a line that opens a block.
const OPEN: char = '{';

enum Block {
    Table,
    Chain(ObservedChain),
    Set(ObservedSet),
    /// A block netwarden does not model (flowtable, counter, quota, ct helper, …).
    Skipped(usize),
}

/// Parses one table's listing.
pub fn parse(listing: &str, key: &TableKey) -> Result<ObservedTable, ListingError> {
    let mut parser = Parser::new(key);
    for (n, raw) in listing.lines().enumerate() {
        parser
            .line(raw.trim())
            .map_err(|message| ListingError::Syntax {
                line: n + 1,
                message,
            })?;
    }
    if parser.elements.is_some() || !parser.stack.is_empty() {
        return Err(ListingError::Syntax {
            line: listing.lines().count(),
            message: "the listing ends inside a block".into(),
        });
    }
    parser
        .table
        .ok_or_else(|| ListingError::NoTable(key.clone()))
}

/// The state of a listing read line by line: the table found so far and the blocks open.
struct Parser<'k> {
    key: &'k TableKey,
    /// `table FAMILY NAME {`: the line that opens the table asked for.
    header: String,
    table: Option<ObservedTable>,
    stack: Vec<Block>,
    /// An `elements = { …` list still open, with its text so far and its brace balance.
    elements: Option<(String, text::Balance)>,
}

impl<'k> Parser<'k> {
    fn new(key: &'k TableKey) -> Self {
        Parser {
            key,
            header: format!("table {} {} {OPEN}", key.family, key.name),
            table: None,
            stack: Vec::new(),
            elements: None,
        }
    }

    /// One trimmed line of the listing.
    fn line(&mut self, line: &str) -> Result<(), String> {
        if self.elements.is_some() {
            return self.continue_elements(line);
        }
        if line.is_empty() || line.starts_with('#') {
            return Ok(());
        }
        let (line, handle) = split_handle(line);
        if self.stack.is_empty() {
            self.top_level(line, handle);
            return Ok(());
        }
        if let Some(Block::Skipped(depth)) = self.stack.last_mut() {
            *depth += line.matches('{').count();
            *depth -= line.matches('}').count().min(*depth);
            if *depth == 0 {
                self.stack.pop();
            }
            return Ok(());
        }
        if line == "}" {
            self.close_block();
            return Ok(());
        }
        match self.stack.last_mut() {
            Some(Block::Table) => self.table_line(line, handle),
            Some(Block::Chain(c)) => chain_line(c, self.key.family, line, handle)?,
            Some(Block::Set(s)) => {
                if let Some(open) = set_line(s, line)? {
                    let mut balance = text::Balance::default();
                    balance.feed(&open);
                    self.elements = Some((open, balance));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A line of an `elements = { …` list that spans several lines.
    fn continue_elements(&mut self, line: &str) -> Result<(), String> {
        let Some((acc, balance)) = &mut self.elements else {
            return Ok(());
        };
        acc.push(' ');
        acc.push_str(line);
        balance.feed(line);
        if balance.depth() == 0 {
            let (list, _) = self.elements.take().unwrap_or_default();
            if let Some(Block::Set(s)) = self.stack.last_mut() {
                s.elements = parse_elements(&list, s.map)?;
            }
        }
        Ok(())
    }

    /// A line outside any block: the table asked for opens, any other block is skipped.
    fn top_level(&mut self, line: &str, handle: Option<u64>) {
        if line == self.header {
            self.table = Some(ObservedTable {
                key: self.key.clone(),
                handle,
                comment: None,
                flags: Vec::new(),
                chains: Vec::new(),
                sets: Vec::new(),
            });
            self.stack.push(Block::Table);
        } else if line.ends_with(OPEN) {
            self.stack.push(Block::Skipped(1));
        }
    }

    /// `}`: a finished chain or set joins the table.
    fn close_block(&mut self) {
        let Some(t) = &mut self.table else {
            self.stack.pop();
            return;
        };
        match self.stack.pop() {
            Some(Block::Chain(c)) => t.chains.push(c),
            Some(Block::Set(s)) => t.sets.push(s),
            _ => {}
        }
    }

    /// A line directly inside the table: a chain or set opens, or a table attribute.
    fn table_line(&mut self, line: &str, handle: Option<u64>) {
        let Some(t) = &mut self.table else { return };
        if let Some(rest) = line.strip_suffix(OPEN) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            self.stack.push(match words.as_slice() {
                ["chain", name] => Block::Chain(ObservedChain {
                    name: (*name).to_owned(),
                    handle,
                    ..ObservedChain::default()
                }),
                [kind @ ("set" | "map"), name] => Block::Set(ObservedSet {
                    name: (*name).to_owned(),
                    handle,
                    map: *kind == "map",
                    ..ObservedSet::default()
                }),
                _ => Block::Skipped(1),
            });
        } else if let Some(c) = line.strip_prefix("comment ") {
            t.comment = quoted(c);
        } else if let Some(f) = line.strip_prefix("flags ") {
            t.flags = f.split(',').map(|s| s.trim().to_owned()).collect();
        }
    }
}

/// A line inside a chain: its base-chain declaration, its comment, or a rule (with its handle).
fn chain_line(
    c: &mut ObservedChain,
    family: NfFamily,
    line: &str,
    handle: Option<u64>,
) -> Result<(), String> {
    if line.starts_with("type ") && line.contains(" hook ") {
        c.base = Some(base_chain(family, line)?);
    } else if let Some(cm) = line.strip_prefix("comment ").and_then(quoted) {
        c.comment = Some(cm);
    } else {
        let Some(handle) = handle else {
            return Err(format!("a rule without a handle: `{line}`"));
        };
        let (body, comment) = text::split_comment(&text::collapse(line));
        c.rules.push(ObservedRule {
            handle,
            text: RuleText { body, comment },
        });
    }
    Ok(())
}

/// A line inside a set. Returns the start of an `elements = { …` list that the next lines
/// continue, if this line opens one.
fn set_line(s: &mut ObservedSet, line: &str) -> Result<Option<String>, String> {
    if line.starts_with("type ") || line.starts_with("typeof ") {
        s.declaration = text::collapse(line);
    } else if let Some(f) = line.strip_prefix("flags ") {
        s.flags = f.split(',').map(|x| x.trim().to_owned()).collect();
    } else if let Some(t) = line.strip_prefix("timeout ") {
        s.timeout = Some(t.trim().to_owned());
    } else if let Some(cm) = line.strip_prefix("comment ").and_then(quoted) {
        s.comment = Some(cm);
    } else if let Some(list) = line.strip_prefix("elements = ") {
        if text::unquoted_balance(list) != 0 {
            return Ok(Some(list.to_owned()));
        }
        s.elements = parse_elements(list, s.map)?;
    } else {
        s.other.push(text::collapse(line));
    }
    Ok(None)
}

fn parse_elements(list: &str, map: bool) -> Result<Vec<Element>, String> {
    let inner = list
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or_else(|| format!("`elements = {list}` is not a `{{ … }}` list"))?;
    Ok(text::split_top(inner, ',')
        .into_iter()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| text::listed_element(e, map))
        .collect())
}

/// `type nat hook prerouting [device "eth0"] priority dstnat; policy accept;`
fn base_chain(family: NfFamily, line: &str) -> Result<BaseChain, String> {
    let mut parts = line.split(';').map(str::trim).filter(|p| !p.is_empty());
    let decl = parts.next().unwrap_or_default();
    let words = text::words(decl);
    let at = |k: &str| words.iter().position(|w| w == k);
    let (Some(t), Some(h), Some(p)) = (at("type"), at("hook"), at("priority")) else {
        return Err(format!("cannot read the base chain line `{line}`"));
    };
    let kind = words.get(t + 1).cloned().unwrap_or_default();
    let hook = words.get(h + 1).cloned().unwrap_or_default();
    let device = at("device")
        .and_then(|d| words.get(d + 1))
        .and_then(|d| quoted(d).or_else(|| Some(d.clone())));
    let prio_text = words[p + 1..].join(" ");
    let priority = schema::priority(family, &hook, &prio_text)?;
    let mut policy = None;
    for part in parts {
        if let Some(p) = part.strip_prefix("policy ") {
            policy = Some(p.trim().to_owned());
        }
    }
    Ok(BaseChain {
        kind,
        hook,
        priority,
        policy,
        device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const KUBE_PROXY: &str = r#"table ip kube-proxy { # handle 222
	comment "rules for kube-proxy"
	set cluster-ips { # handle 12
		type ipv4_addr
		comment "Active ClusterIPs"
		elements = { 10.96.0.1, 10.96.0.10 }
	}

	map service-ips { # handle 14
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = { 10.96.0.10 . udp . 53 : goto service-FOO-kube-system/kube-dns/udp/dns,
			     10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https }
	}

	flowtable ft { # handle 30
		hook ingress priority filter
		devices = { lo }
	}

	chain nat-prerouting { # handle 1
		type nat hook prerouting priority dstnat; policy accept;
		jump services # handle 17
	}

	chain cluster-ips-check { # handle 5
		ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs" # handle 21
		ip daddr 10.96.0.0/16 drop comment "Drop # traffic" # handle 22
	}

	chain service-2QRHZV4L-default/kubernetes/tcp/https { # handle 9
		numgen random mod 1 vmap { 0 : goto endpoint-AAAA-default/kubernetes/tcp/https__10.200.0.1/6443 } # handle 31
	}
}
"#;

    fn key() -> TableKey {
        TableKey {
            family: NfFamily::Ip,
            name: "kube-proxy".into(),
        }
    }

    #[test]
    fn reads_a_kube_proxy_table() {
        let t = parse(KUBE_PROXY, &key()).unwrap();
        assert_eq!(t.handle, Some(222));
        assert_eq!(t.comment.as_deref(), Some("rules for kube-proxy"));
        assert_eq!(t.sets.len(), 2);
        let ips = t.set("cluster-ips").unwrap();
        assert_eq!(ips.declaration, "type ipv4_addr");
        assert_eq!(ips.elements.len(), 2);
        let map = t.set("service-ips").unwrap();
        assert!(map.map);
        assert_eq!(map.elements[1].key, "10.96.0.1 . tcp . 443");
        assert_eq!(
            map.elements[1].value.as_deref(),
            Some("goto service-2QRHZV4L-default/kubernetes/tcp/https")
        );
        assert_eq!(t.chains.len(), 3, "the flowtable is skipped");
        let pre = t.chain("nat-prerouting").unwrap();
        let base = pre.base.as_ref().unwrap();
        assert_eq!(
            (base.kind.as_str(), base.hook.as_str(), base.priority),
            ("nat", "prerouting", -100)
        );
        assert_eq!(base.policy.as_deref(), Some("accept"));
        assert_eq!(pre.rules[0].handle, 17);
        assert_eq!(pre.rules[0].text.body, "jump services");
        let check = t.chain("cluster-ips-check").unwrap();
        assert_eq!(check.rules[1].text.body, "ip daddr 10.96.0.0/16 drop");
        assert_eq!(
            check.rules[1].text.comment.as_deref(),
            Some("Drop # traffic")
        );
        let svc = t
            .chain("service-2QRHZV4L-default/kubernetes/tcp/https")
            .unwrap();
        assert!(svc.rules[0].text.body.ends_with("__10.200.0.1/6443 }"));
    }

    #[test]
    fn netdev_chains_dormant_tables_and_set_options() {
        let listing = r#"table netdev nd { # handle 223
	flags dormant
	set s6 { # handle 9
		type ipv4_addr
		size 1000
		flags dynamic,timeout
		timeout 5m
		elements = { 5.5.5.5 }
	}
	chain ing { # handle 1
		comment "hello"
		type filter hook ingress device "d0" priority filter - 10; policy accept;
		ip saddr 1.2.3.4 drop # handle 2
	}
}"#;
        let key = TableKey {
            family: NfFamily::Netdev,
            name: "nd".into(),
        };
        let t = parse(listing, &key).unwrap();
        assert!(t.dormant());
        let s = t.set("s6").unwrap();
        assert_eq!(s.flags, vec!["dynamic", "timeout"]);
        assert_eq!(s.timeout.as_deref(), Some("5m"));
        assert_eq!(s.other, vec!["size 1000"]);
        let c = t.chain("ing").unwrap();
        assert_eq!(c.comment.as_deref(), Some("hello"));
        let b = c.base.as_ref().unwrap();
        assert_eq!((b.device.as_deref(), b.priority), (Some("d0"), -10));
    }

    #[test]
    fn broken_listings_are_errors() {
        assert_eq!(
            parse("table ip other { # handle 1\n}\n", &key()),
            Err(ListingError::NoTable(key()))
        );
        assert!(parse(
            "table ip kube-proxy { # handle 1\n\tchain a { # handle 2\n",
            &key()
        )
        .is_err());
        assert!(
            parse(
                "table ip kube-proxy {\n\tchain a {\n\t\taccept\n\t}\n}\n",
                &key()
            )
            .is_err(),
            "rules without handles cannot be repaired by handle"
        );
    }

    #[test]
    fn set_lines_open_a_multi_line_element_list_and_chain_lines_need_handles() {
        let mut s = ObservedSet::default();
        assert_eq!(set_line(&mut s, "elements = { 1.1.1.1 }"), Ok(None));
        assert_eq!(s.elements.len(), 1);
        assert_eq!(
            set_line(&mut s, "elements = { 1.1.1.1,"),
            Ok(Some("{ 1.1.1.1,".to_owned()))
        );
        assert_eq!(set_line(&mut s, "policy memory"), Ok(None));
        assert_eq!(s.other, vec!["policy memory"]);

        let mut c = ObservedChain::default();
        assert!(chain_line(&mut c, NfFamily::Ip, "accept", None).is_err());
        chain_line(&mut c, NfFamily::Ip, "accept", Some(4)).unwrap();
        assert_eq!(
            (c.rules[0].handle, c.rules[0].text.body.as_str()),
            (4, "accept")
        );
    }
}
