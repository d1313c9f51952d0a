use super::*;

const NESTED: u16 = 0x8000;

fn attrs(list: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in list {
        put_attr(&mut out, *k, v);
    }
    out
}

fn msg(kind: u16, list: &[(u16, &[u8])]) -> Msg {
    Msg {
        kind,
        family: 2,
        attrs: attrs(list),
    }
}

/// A table holding `used` chains and sets, with these flags.
fn table(used: u32, flags: u32) -> Msg {
    msg(
        0,
        &[
            (1, b"kube-proxy\0"),
            (TABLE_FLAGS, &flags.to_be_bytes()),
            (TABLE_USE, &used.to_be_bytes()),
            (TABLE_HANDLE, &9u64.to_be_bytes()),
        ],
    )
}

fn set(name: &str, flags: u32) -> Msg {
    let name = format!("{name}\0");
    msg(
        9,
        &[
            (1, b"kube-proxy\0"),
            (SET_NAME, name.as_bytes()),
            (SET_FLAGS, &flags.to_be_bytes()),
            (SET_HANDLE, &3u64.to_be_bytes()),
        ],
    )
}

fn rule(handle: u64, position: Option<u64>) -> Msg {
    let mut list: Vec<(u16, Vec<u8>)> = vec![
        (1, b"kube-proxy\0".to_vec()),
        (2, b"services\0".to_vec()),
        (RULE_HANDLE, handle.to_be_bytes().to_vec()),
        (4 | NESTED, attrs(&[(1 | NESTED, b"meta\0\0\0\0")])),
        (RULE_USERDATA_FOR_TEST, b"\x00\x05hello".to_vec()),
    ];
    if let Some(p) = position {
        list.push((RULE_POSITION, p.to_be_bytes().to_vec()));
    }
    let borrowed: Vec<(u16, &[u8])> = list.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    msg(6, &borrowed)
}

const RULE_USERDATA_FOR_TEST: u16 = 7;

/// What the config names for [`dump`]'s table.
fn census() -> Census {
    Census {
        chains: 1,
        rules: 2,
        sets: BTreeMap::from([("cluster-ips".to_string(), 0)]),
    }
}

fn dump() -> Dump {
    Dump {
        table: Some(table(2, 0)),
        chains: vec![msg(
            3,
            &[
                (1, b"kube-proxy\0"),
                (CHAIN_HANDLE, &1u64.to_be_bytes()),
                (3, b"services\0"),
                (CHAIN_USE, &2u32.to_be_bytes()),
            ],
        )],
        sets: vec![set("cluster-ips", 0)],
        elements: vec![msg(
            12,
            &[
                (1, b"kube-proxy\0"),
                (2, b"cluster-ips\0"),
                (3 | NESTED, b""),
            ],
        )],
        rules: vec![rule(4, None), rule(5, Some(4))],
    }
}

/// The batch's messages: (type, flags, seq, nfgenmsg res_id, attribute types).
fn parsed(bytes: &[u8]) -> Vec<(u16, u16, u32, u16, Vec<u16>)> {
    let mut out = Vec::new();
    let mut b = bytes;
    while !b.is_empty() {
        let len = u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize;
        assert_eq!(len % 4, 0, "every message is padded");
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        let flags = u16::from_ne_bytes([b[6], b[7]]);
        let seq = u32::from_ne_bytes(b[8..12].try_into().unwrap());
        let res_id = u16::from_be_bytes([b[18], b[19]]);
        let types = raw_attributes(&b[20..len])
            .iter()
            .map(|(k, _)| *k)
            .collect();
        out.push((kind, flags, seq, res_id, types));
        b = &b[len..];
    }
    out
}

#[test]
fn the_batch_creates_the_table_then_chains_sets_elements_rules_without_what_only_a_dump_says() {
    let image = Image::of_table(dump(), &census()).unwrap();
    assert_eq!(image.len(), 6);
    let (bytes, acks) = batch(&[&image], 0x01020304, 100);
    assert_eq!(acks, 6);
    let msgs = parsed(&bytes);
    let kinds: Vec<u16> = msgs.iter().map(|m| m.0).collect();
    let nft = |t: u16| (SUBSYS_NFTABLES << 8) | t;
    assert_eq!(
        kinds,
        [
            BATCH_BEGIN,
            nft(0),
            nft(3),
            nft(9),
            nft(12),
            nft(6),
            nft(6),
            BATCH_END
        ]
    );
    let seqs: Vec<u32> = msgs.iter().map(|m| m.2).collect();
    assert_eq!(seqs, (100..108).collect::<Vec<u32>>());
    // The batch markers name the subsystem; the begin carries the generation it is valid at.
    assert_eq!((msgs[0].3, msgs[7].3), (SUBSYS_NFTABLES, SUBSYS_NFTABLES));
    assert_eq!(msgs[0].4, [BATCH_GENID]);
    let genid = attr(&bytes[20..], BATCH_GENID).unwrap();
    assert_eq!(genid, 0x01020304u32.to_be_bytes());
    // Handles, positions and use counts are the dump's, not the request's.
    assert_eq!(msgs[1].4, [1, TABLE_FLAGS]);
    assert_eq!(msgs[2].4, [1, 3]);
    assert_eq!(
        msgs[3].4,
        [1, SET_NAME, SET_FLAGS, SET_ID],
        "an id, as the kernel requires"
    );
    for r in &msgs[5..7] {
        assert_eq!(
            r.4,
            [1, 2, 4 | NESTED, RULE_USERDATA_FOR_TEST],
            "flag bits kept"
        );
        assert_eq!(
            r.1,
            F_REQUEST | F_ACK | F_CREATE | F_APPEND,
            "appended in order"
        );
    }
    for m in &msgs[1..5] {
        assert_eq!(m.1, F_REQUEST | F_ACK | F_CREATE);
    }
}

#[test]
fn several_tables_go_in_one_batch() {
    let a = Image::of_table(dump(), &census()).unwrap();
    let b = Image::of_table(dump(), &census()).unwrap();
    let (bytes, acks) = batch(&[&a, &b], 1, 1);
    assert_eq!(acks, 12);
    assert_eq!(parsed(&bytes).len(), 14);
}

#[test]
fn what_an_image_cannot_restore_exactly_has_none() {
    let with = |f: &dyn Fn(&mut Dump)| {
        let mut d = dump();
        f(&mut d);
        Image::of_table(d, &census())
    };
    assert_eq!(with(&|d| d.table = None), Err(Unfit::NoTable));
    assert_eq!(with(&|d| d.table = Some(table(2, 0x2))), Err(Unfit::Owned));
    assert_eq!(with(&|d| d.table = Some(table(2, 0x4))), Err(Unfit::Owned));
    assert_eq!(
        with(&|d| d.table = Some(table(3, 0))),
        Err(Unfit::OtherObjects),
        "a use count above the chains and sets: a named object or a flowtable"
    );
    for flags in [0x1, 0x10, 0x11] {
        assert_eq!(
            with(&|d| d.sets = vec![set("cluster-ips", flags)]),
            Err(Unfit::SetKind("cluster-ips".into()))
        );
    }
    // More than the config names: a rule, a set or an element of the owner's.
    assert_eq!(
        with(&|d| d.rules.push(rule(6, Some(5)))),
        Err(Unfit::MoreThanConfigured)
    );
    assert_eq!(
        with(&|d| d.sets.push(set("nodeport-ips", 0))),
        Err(Unfit::MoreThanConfigured)
    );
    let mut one = Vec::new();
    put_attr(&mut one, 1 | NESTED, &attrs(&[(1 | NESTED, b"")]));
    assert_eq!(
        with(&|d| d.elements[0] = msg(
            12,
            &[
                (1, b"kube-proxy\0"),
                (2, b"cluster-ips\0"),
                (3 | NESTED, &one)
            ]
        )),
        Err(Unfit::MoreThanConfigured)
    );
    // An anonymous set is the rule's, as a listing shows it; it counts in the use count.
    let anonymous = with(&|d| {
        d.sets.push(set("__set0", 0x2 | 0x1_00));
        d.table = Some(table(3, 0));
    });
    assert!(anonymous.is_ok(), "{anonymous:?}");
    // Dormant (0x1) is a flag the table is created with again.
    assert!(with(&|d| d.table = Some(table(2, 0x1))).is_ok());
}

#[test]
fn a_truncated_attribute_ends_the_list() {
    let mut m = rule(4, None);
    m.attrs.truncate(m.attrs.len() - 2);
    let stripped = strip(m, &[RULE_HANDLE]);
    assert_eq!(
        raw_attributes(&stripped.attrs)
            .iter()
            .map(|(k, _)| *k)
            .collect::<Vec<_>>(),
        [1, 2, 4 | NESTED]
    );
}

/// A rule whose one expression is `immediate` with verdict `code` to `chain`.
fn verdict_rule(code: i32, chain: &str) -> Msg {
    let target = format!("{chain}\0");
    let verdict = attrs(&[
        (VERDICT_CODE, &code.to_be_bytes()),
        (VERDICT_CHAIN, target.as_bytes()),
    ]);
    let data = attrs(&[(DATA_VERDICT | NESTED, &verdict)]);
    let imm = attrs(&[(1, &0u32.to_be_bytes()), (IMMEDIATE_DATA | NESTED, &data)]);
    let expr = attrs(&[(EXPR_NAME, b"immediate\0"), (EXPR_DATA | NESTED, &imm)]);
    let list = attrs(&[(1 | NESTED, &expr)]);
    msg(
        6,
        &[
            (1, b"nat\0"),
            (2, b"POSTROUTING\0"),
            (RULE_HANDLE, &7u64.to_be_bytes()),
            (RULE_EXPRESSIONS | NESTED, &list),
            (RULE_POSITION, &3u64.to_be_bytes()),
        ],
    )
}

#[test]
fn a_jump_or_goto_to_the_chain_is_found_by_its_verdict() {
    assert!(jumps_to(
        &verdict_rule(NFT_JUMP, "FLANNEL-POSTRTG"),
        "FLANNEL-POSTRTG"
    ));
    assert!(jumps_to(
        &verdict_rule(NFT_GOTO, "FLANNEL-POSTRTG"),
        "FLANNEL-POSTRTG"
    ));
    assert!(!jumps_to(
        &verdict_rule(NFT_JUMP, "OTHER"),
        "FLANNEL-POSTRTG"
    ));
    // -1 is NF_ACCEPT's verdict code space (accept, drop, return): not a jump.
    assert!(!jumps_to(
        &verdict_rule(-5, "FLANNEL-POSTRTG"),
        "FLANNEL-POSTRTG"
    ));
    assert!(!jumps_to(&rule(4, None), "services"));
}

#[test]
fn a_chain_image_puts_its_rules_in_order_and_each_jump_first_or_last() {
    let chain = msg(
        3,
        &[
            (1, b"nat\0"),
            (CHAIN_HANDLE, &9u64.to_be_bytes()),
            (3, b"FLANNEL-POSTRTG\0"),
        ],
    );
    let image = Image::of_chain(
        chain,
        vec![rule(4, None), rule(5, Some(4))],
        vec![
            (verdict_rule(NFT_JUMP, "FLANNEL-POSTRTG"), true),
            (verdict_rule(NFT_JUMP, "FLANNEL-POSTRTG"), false),
        ],
    );
    let (bytes, acks) = batch(&[&image], 3, 1);
    assert_eq!(acks, 5);
    let msgs = parsed(&bytes);
    let flags: Vec<u16> = msgs[1..6]
        .iter()
        .map(|m| m.1 & !(F_REQUEST | F_ACK))
        .collect();
    assert_eq!(
        flags,
        [
            F_CREATE,
            F_CREATE | F_APPEND,
            F_CREATE | F_APPEND,
            F_CREATE,
            F_CREATE | F_APPEND
        ],
        "rules appended; the first jump at the head, the other appended"
    );
    assert_eq!(msgs[1].4, [1, 3], "no handle");
    for jump in &msgs[4..6] {
        assert!(!jump.4.contains(&RULE_HANDLE) && !jump.4.contains(&RULE_POSITION));
    }
}

/// `meta l4proto` compared with `proto` (`op` 0: equal, 1: not), as iptables-nft writes `-p`.
fn l4proto(op: u32, proto: u8) -> [Vec<u8>; 2] {
    use super::super::spare::build_for_tests::expr;
    let mut meta = Vec::new();
    put_attr(&mut meta, 1, &1u32.to_be_bytes());
    put_attr(&mut meta, 2, &16u32.to_be_bytes());
    let mut value = Vec::new();
    put_attr(&mut value, 1, &[proto]);
    let mut cmp = Vec::new();
    put_attr(&mut cmp, 1, &1u32.to_be_bytes());
    put_attr(&mut cmp, 2, &op.to_be_bytes());
    put_attr(&mut cmp, 3 | 0x8000, &value);
    [expr("meta", &meta), expr("cmp", &cmp)]
}

#[test]
fn a_rule_with_an_xtables_match_gets_back_the_protocol_it_matched_as_its_compat_attribute() {
    use super::super::spare::build_for_tests::{comment, counter, rule, target};
    const RULE_COMPAT: u16 = 5;
    let compat = |m: &Msg| attr(&m.attrs, RULE_COMPAT).map(<[u8]>::to_vec);
    let expected = |proto: u32, flags: u32| {
        let mut v = Vec::new();
        put_attr(&mut v, 1, &proto.to_be_bytes());
        put_attr(&mut v, 2, &flags.to_be_bytes());
        Some(v)
    };
    // `-p tcp -m comment … -m multiport … -j MASQUERADE`, `! -p udp -m comment …`.
    let [meta, cmp] = l4proto(0, 6);
    let tcp = rule(
        "X",
        &[meta, cmp, comment("x"), counter(), target("MASQUERADE")],
    );
    assert_eq!(compat(&with_compat(tcp)), expected(6, 0));
    let [meta, cmp] = l4proto(1, 17);
    let not_udp = rule("X", &[meta, cmp, comment("x"), counter()]);
    assert_eq!(compat(&with_compat(not_udp)), expected(17, 2), "inverted");
    // Native only: nothing checks it.
    let [meta, cmp] = l4proto(0, 6);
    let native = rule("X", &[meta, cmp, counter()]);
    assert_eq!(with_compat(native.clone()), native);
    // No `-p`: none (the kernel then checks against no protocol, as iptables-nft wrote it).
    let bare = rule("X", &[comment("x"), counter()]);
    assert_eq!(with_compat(bare.clone()), bare);
    // Already there: kept.
    let [meta, cmp] = l4proto(0, 6);
    let mut given = rule("X", &[meta, cmp, comment("x")]);
    put_attr(&mut given.attrs, RULE_COMPAT, &[0; 8]);
    assert_eq!(with_compat(given.clone()), given);
    // Images of chains carry it.
    let [meta, cmp] = l4proto(0, 6);
    let image = Image::of_chain(
        Msg::default(),
        vec![rule("X", &[meta, cmp, comment("x"), target("DNAT")])],
        vec![],
    );
    assert_eq!(compat(&image.requests[1].0), expected(6, 0));
}
