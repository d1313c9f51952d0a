use super::build_for_tests::*;
use super::*;

fn text(m: &Msg, kind: u16) -> Option<String> {
    attr(&m.attrs, kind).map(super::super::events::string)
}

fn names(rule: &Msg) -> Vec<String> {
    expressions(rule)
        .iter()
        .map(|e| expr_name(e).unwrap_or_default())
        .collect()
}

#[test]
fn the_name_is_stable_within_iptables_limit_and_differs_per_chain() {
    let a = name(2, "nat", "FLANNEL-POSTRTG");
    assert_eq!(a, name(2, "nat", "FLANNEL-POSTRTG"));
    assert!(a.len() <= 28, "{a}");
    assert!(is_spare(&a));
    assert_ne!(a, name(10, "nat", "FLANNEL-POSTRTG"), "per family");
    assert_ne!(a, name(2, "filter", "FLANNEL-POSTRTG"), "per table");
    assert_ne!(a, name(2, "nat", "FLANNEL-POSTRTG2"), "per chain");
    assert!(!is_spare("FLANNEL-POSTRTG"));
}

#[test]
fn the_spare_is_the_chain_and_its_rules_renamed_and_nothing_else() {
    let image = flannel();
    let spare = build(&image, "NETWARDEN-SPARE-00000001").unwrap();
    assert_eq!(
        spare.requests.len(),
        2,
        "the chain and its one rule, no jump"
    );
    let (chain, flags) = &spare.requests[0];
    assert_eq!(chain.kind, NEWCHAIN);
    assert_eq!(
        text(chain, CHAIN_NAME).as_deref(),
        Some("NETWARDEN-SPARE-00000001")
    );
    assert_eq!(*flags, F_CREATE | F_EXCL, "refused if a spare is there");
    let (rule, flags) = &spare.requests[1];
    assert_eq!(
        text(rule, RULE_CHAIN).as_deref(),
        Some("NETWARDEN-SPARE-00000001")
    );
    assert_eq!(*flags, F_CREATE | F_APPEND);
    assert_eq!(
        names(rule),
        ["match", "counter", "target"],
        "expressions as they were"
    );
    assert_eq!(
        expressions(rule),
        expressions(&image.requests[1].0),
        "byte for byte"
    );
}

#[test]
fn no_spare_for_native_rules_or_a_base_chain() {
    let native = Image::of_chain(
        chain("KUBE-X"),
        vec![rule("KUBE-X", &[counter(), jump("KUBE-Y")])],
        vec![],
    );
    assert!(build(&native, "S").is_none(), "nothing a spare would save");
    let mut base = chain("POSTROUTING");
    put_attr(&mut base.attrs, CHAIN_HOOK | NESTED, &[0u8; 8]);
    let hooked = Image::of_chain(
        base,
        vec![rule("POSTROUTING", &[comment("x"), target("MASQUERADE")])],
        vec![],
    );
    assert!(build(&hooked, "S").is_none(), "a copy would be hooked in");
    // A copy that would hold on to an owner's chain or set.
    let jumping = Image::of_chain(
        chain("CNI-HOSTPORT-DNAT"),
        vec![rule(
            "CNI-HOSTPORT-DNAT",
            &[comment("dnat"), counter(), jump("CNI-DN-1")],
        )],
        vec![],
    );
    assert!(
        build(&jumping, "S").is_none(),
        "CNI-DN-1 could not be deleted"
    );
    let set_match = expr("match", &{
        let mut d = Vec::new();
        put_attr(&mut d, MATCH_NAME, &c_str("set"));
        put_attr(&mut d, MATCH_REV, &4u32.to_be_bytes());
        d
    });
    let with_set = Image::of_chain(
        chain("KUBE-ROUTER-X"),
        vec![rule(
            "KUBE-ROUTER-X",
            &[set_match, counter(), target("MASQUERADE")],
        )],
        vec![],
    );
    assert!(
        build(&with_set, "S").is_none(),
        "the ipset could not be destroyed"
    );
    let lookup = Image::of_chain(
        chain("X"),
        vec![rule("X", &[expr("lookup", &[]), target("MASQUERADE")])],
        vec![],
    );
    assert!(build(&lookup, "S").is_none(), "a named set");
    let set_target = Image::of_chain(
        chain("X"),
        vec![rule("X", &[comment("x"), target("SET")])],
        vec![],
    );
    assert!(build(&set_target, "S").is_none());
    // A table image is no chain image.
    assert!(build(&Image::of_chain(chain("C"), vec![], vec![]), "S").is_none());
}

#[test]
fn the_swap_renames_the_spare_by_handle_and_jumps_to_it_with_the_comment_as_user_data() {
    let image = flannel();
    let swap = swap(&image, "NETWARDEN-SPARE-00000001", 0x1234).unwrap();
    assert_eq!(swap.requests.len(), 2, "the rename and the jump, no rules");
    let (rename, flags) = &swap.requests[0];
    assert_eq!(rename.kind, NEWCHAIN);
    assert_eq!(*flags, 0, "an update, not a creation");
    assert_eq!(text(rename, CHAIN_NAME).as_deref(), Some("FLANNEL-POSTRTG"));
    assert_eq!(
        attr(&rename.attrs, CHAIN_HANDLE),
        Some(&0x1234u64.to_be_bytes()[..])
    );
    let (jump, flags) = &swap.requests[1];
    assert_eq!(
        *flags, image.requests[2].1,
        "first in POSTROUTING as before"
    );
    assert_eq!(text(jump, RULE_CHAIN).as_deref(), Some("POSTROUTING"));
    assert_eq!(
        names(jump),
        ["counter", "immediate"],
        "no compat expression"
    );
    assert!(
        super::super::replay::jumps_to(jump, "NETWARDEN-SPARE-00000001"),
        "to the spare's name until the commit renames it"
    );
    assert!(!super::super::replay::jumps_to(jump, "FLANNEL-POSTRTG"));
    assert_eq!(
        attr(&jump.attrs, RULE_USERDATA),
        Some(&b"\x00\x0eflanneld masq\x00"[..]),
        "libnftnl's comment record"
    );
}

#[test]
fn a_comment_is_left_a_match_where_the_printed_rule_would_change() {
    let spare = "NETWARDEN-SPARE-00000001";
    let jumping = |exprs: &[Vec<u8>]| {
        let jump = rule("POSTROUTING", exprs);
        let image = Image::of_chain(
            chain("C"),
            vec![rule("C", &[comment("x"), target("MASQUERADE")])],
            vec![(jump, false)],
        );
        swap(&image, spare, 1).unwrap().requests[1].0.clone()
    };
    // Another match after the comment: printed after it now, before it as user data.
    let other = expr("match", &{
        let mut d = Vec::new();
        put_attr(&mut d, MATCH_NAME, &c_str("addrtype"));
        put_attr(&mut d, MATCH_REV, &1u32.to_be_bytes());
        d
    });
    let r = jumping(&[comment("x"), other.clone(), counter(), jump("C")]);
    assert_eq!(names(&r), ["match", "match", "counter", "immediate"]);
    assert!(attr(&r.attrs, RULE_USERDATA).is_none());
    assert!(
        super::super::replay::jumps_to(&r, spare),
        "still retargeted"
    );
    // Two comments.
    let r = jumping(&[comment("x"), comment("y"), jump("C")]);
    assert_eq!(names(&r), ["match", "match", "immediate"]);
    // An empty comment.
    let r = jumping(&[comment(""), jump("C")]);
    assert_eq!(names(&r), ["match", "immediate"]);
    // Before a match that is not the comment: converted.
    let r = jumping(&[other, comment("x"), counter(), jump("C")]);
    assert_eq!(names(&r), ["match", "counter", "immediate"]);
    assert_eq!(attr(&r.attrs, RULE_USERDATA), Some(&b"\x00\x02x\x00"[..]));
}

#[test]
fn the_removal_flushes_then_deletes_the_spare() {
    let r = removal(2, "nat", "NETWARDEN-SPARE-00000001");
    let kinds: Vec<u16> = r.requests.iter().map(|(m, _)| m.kind).collect();
    assert_eq!(kinds, [DELRULE, DELCHAIN]);
    let (flush, chain) = (&r.requests[0].0, &r.requests[1].0);
    assert_eq!(text(flush, RULE_TABLE).as_deref(), Some("nat"));
    assert_eq!(
        text(flush, RULE_CHAIN).as_deref(),
        Some("NETWARDEN-SPARE-00000001")
    );
    assert_eq!(text(chain, CHAIN_TABLE).as_deref(), Some("nat"));
    assert_eq!(
        text(chain, CHAIN_NAME).as_deref(),
        Some("NETWARDEN-SPARE-00000001")
    );
}
