//! The fuzz targets (fuzz/fuzz_targets) as a bounded, libFuzzer-free test: every file of the seed
//! corpus (fuzz/corpus/<target>/, with the regression inputs of crashes found so far) plus
//! mutated inputs from a small deterministic mutator go through the three parsers that read
//! untrusted text. None may panic, and every error must be displayable. NETWARDEN_FUZZ_ITERATIONS
//! sets the number of mutated inputs per target (default 3,000: about a second).

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

fn iterations() -> usize {
    std::env::var("NETWARDEN_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

/// xorshift64*: deterministic, so a failure names an input that can be rebuilt.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Tokens the parsers give meaning to: splicing them in reaches deeper than random bytes.
const TOKENS: &[&str] = &[
    "\n",
    " ",
    "\"",
    "\\",
    "\\\"",
    "*filter\n",
    "*nat\n",
    "COMMIT\n",
    ":",
    ":FOO - [0:0]\n",
    "-A ",
    "-N ",
    "! ",
    "--comment ",
    "-m set --match-set ",
    "add ",
    "create ",
    " timeout ",
    " comment ",
    "hash:net",
    "hash:ip,port",
    "family inet6",
    ",",
    "/",
    "/33",
    "/129",
    "::",
    "0x",
    "-1",
    "99999999999999999999",
    "{{",
    "}}",
    "{{ .node.podCIDRs }}",
    "${",
    ": ",
    "- ",
    "  ",
    "---\n",
    "&a ",
    "*a ",
    "!!str ",
    "[",
    "]",
    "{",
    "}",
    "\t",
    "é",
    "\u{0}",
    "\u{feff}",
    "#",
];

fn mutate(rng: &mut Rng, input: &[u8], others: &[(PathBuf, Vec<u8>)]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                data.drain(start..end);
            }
            3 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                let chunk = data[start..end].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            4 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let at = rng.below(len + 1);
                data.splice(at..at, token.iter().copied());
            }
            5 if len > 0 => data.truncate(rng.below(len)),
            6 => {
                // Splice a line range from another corpus file.
                let other = &others[rng.below(others.len())].1;
                if !other.is_empty() {
                    let start = rng.below(other.len());
                    let end = (start + 1 + rng.below(200)).min(other.len());
                    let at = rng.below(len + 1);
                    data.splice(at..at, other[start..end].iter().copied());
                }
            }
            _ => {
                // Repeat a line: duplicates and long inputs.
                let text = data.clone();
                if let Some(line) = text.split(|&b| b == b'\n').nth(rng.below(8)) {
                    let at = rng.below(len + 1);
                    let mut line = line.to_vec();
                    line.push(b'\n');
                    data.splice(at..at, line);
                }
            }
        }
    }
    data
}

/// Runs `check` on the corpus and on mutated inputs; a panic names the input (saved under
/// target/fuzz-replay-failures/ to become a regression corpus file).
fn replay(target: &str, check: fn(&str)) {
    let corpus = corpus(target);
    let run = |name: &str, data: &[u8]| {
        let text = String::from_utf8_lossy(data);
        if std::panic::catch_unwind(|| check(&text)).is_err() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-replay-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{target}-{name}"));
            std::fs::write(&path, data).unwrap();
            panic!(
                "{target}: panic on input {name}, saved as {}",
                path.display()
            );
        }
    };
    for (path, data) in &corpus {
        run(&path.file_name().unwrap().to_string_lossy(), data);
    }
    let mut rng = Rng(0x6e65_7477_6172_6465 ^ target.len() as u64);
    for i in 0..iterations() {
        let seed = &corpus[rng.below(corpus.len())].1;
        let data = mutate(&mut rng, seed, &corpus);
        run(&format!("mutation-{i}"), &data);
    }
}

fn displayable(e: impl std::fmt::Display) {
    assert!(!e.to_string().is_empty(), "an error that says nothing");
}

#[test]
fn config_parser_never_panics() {
    replay("config", |text| {
        if let Err(e) = netwarden::config::parse("fuzz.yaml", text) {
            displayable(e);
        }
        if let Err(e) = netwarden::config::parse_kubernetes("configmap/fuzz", text) {
            displayable(e);
        }
    });
}

#[test]
fn iptables_save_parser_never_panics() {
    replay("iptables_save", |text| {
        if let Err(e) = netwarden::netfilter::parse::iptables_save(text) {
            displayable(e);
        }
        let _ = netwarden::netfilter::parse::count_rules(text);
    });
}

#[test]
fn ipset_save_parser_never_panics() {
    replay("ipset_save", |text| {
        if let Err(e) = netwarden::netfilter::parse::ipset_save(text) {
            displayable(e);
        }
        let _ = netwarden::netfilter::parse::ipset_list_terse(text);
    });
}

/// The corpus holds real output; the parsers must accept every one of those files.
#[test]
fn real_output_in_the_corpus_parses() {
    for (path, data) in corpus("iptables_save") {
        let text = String::from_utf8(data).unwrap();
        let tables = netwarden::netfilter::parse::iptables_save(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!tables.is_empty(), "{}", path.display());
    }
    for (path, data) in corpus("ipset_save") {
        let text = String::from_utf8(data).unwrap();
        let sets = netwarden::netfilter::parse::ipset_save(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!sets.is_empty(), "{}", path.display());
    }
}
