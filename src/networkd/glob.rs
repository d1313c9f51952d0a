//! fnmatch(3) with no flags, as systemd's `[Match]` settings use it: `*` and `?` match any
//! characters (`/` and a leading `.` included: no FNM_PATHNAME, no FNM_PERIOD), `[...]` a set
//! (`!` or `^` negates, ranges `a-z`, `]` first is literal), a backslash makes the next character
//! literal. An unterminated `[` is a literal `[`. Pure.

/// Whether `name` matches `pattern`.
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    matches(&p, &n)
}

fn matches(p: &[char], n: &[char]) -> bool {
    // Iterative with one backtrack point for the last `*`, as glibc's fnmatch effectively does.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((ok, next)) = set(&p[pi..], n[ni]) {
                        if ok {
                            pi += next;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                '\\' if pi + 1 < p.len() => {
                    if p[pi + 1] == n[ni] {
                        pi += 2;
                        ni += 1;
                        continue;
                    }
                }
                c => {
                    if c == n[ni] {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A bracket expression at the start of `p`: whether `c` is in it, and its length. `None`: not
/// a complete bracket expression.
fn set(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut found = false;
    let mut first = true;
    loop {
        let ch = *p.get(i)?;
        if ch == ']' && !first {
            return Some((found != negate, i + 1));
        }
        first = false;
        let (lo, step) = if ch == '\\' {
            (*p.get(i + 1)?, 2)
        } else {
            (ch, 1)
        };
        i += step;
        if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|c| *c != ']') {
            let hi = if p[i + 1] == '\\' {
                *p.get(i + 2)?
            } else {
                p[i + 1]
            };
            i += if p[i + 1] == '\\' { 3 } else { 2 };
            found |= lo <= c && c <= hi;
        } else {
            found |= lo == c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fnmatch;

    #[test]
    fn globs_as_fnmatch_without_flags() {
        assert!(fnmatch("eth0", "eth0"));
        assert!(!fnmatch("eth0", "eth01"));
        assert!(fnmatch("en*", "enp0s3"));
        assert!(fnmatch("*", ""));
        assert!(fnmatch("*", "anything/with.dots"));
        assert!(fnmatch("e?h*", "eth0"));
        assert!(!fnmatch("e?h", "eh"));
        assert!(fnmatch("eth[0-3]", "eth2"));
        assert!(!fnmatch("eth[0-3]", "eth4"));
        assert!(fnmatch("eth[!0-3]", "eth4"));
        assert!(fnmatch("eth[^0]", "eth1"));
        assert!(fnmatch("a[]]b", "a]b"));
        assert!(fnmatch("a\\*b", "a*b"));
        assert!(!fnmatch("a\\*b", "axb"));
        assert!(fnmatch("a[b", "a[b"), "an unterminated set is literal");
        assert!(fnmatch("*-*-*", "vb-a-b"));
        assert!(!fnmatch("*x", "abc"));
        assert!(fnmatch("ve-*", "ve-foo"));
        assert!(!fnmatch("ve-*", "veth0"));
    }
}
