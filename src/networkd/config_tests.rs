//! Tests of `config`: search paths, masking, drop-ins, [Match].

use super::*;
use std::collections::BTreeMap;

/// Files by path; `None` content is a mask.
#[derive(Default)]
pub struct MapTree(pub BTreeMap<String, Option<String>>);

impl MapTree {
    pub fn with(mut self, path: &str, text: &str) -> MapTree {
        self.0.insert(path.to_string(), Some(text.to_string()));
        self
    }
    pub fn masked(mut self, path: &str) -> MapTree {
        self.0.insert(path.to_string(), None);
        self
    }
}

impl Tree for MapTree {
    fn list(&self, dir: &str) -> Vec<(String, Option<String>)> {
        let prefix = format!("{dir}/");
        self.0
            .iter()
            .filter_map(|(p, t)| {
                let name = p.strip_prefix(&prefix)?;
                (!name.contains('/')).then(|| (name.to_string(), t.clone()))
            })
            .collect()
    }
    fn read(&self, path: &str) -> Option<String> {
        self.0.get(path).cloned().flatten()
    }
}

fn link(name: &str) -> LinkFacts {
    LinkFacts {
        index: 2,
        name: name.into(),
        iftype: Some("ether".into()),
        kind: Some("veth".into()),
        driver: Some("veth".into()),
        mac: Some("02:00:00:00:00:01".into()),
        ..LinkFacts::default()
    }
}

#[test]
fn settings_default_to_managing_foreign_rules_and_routes() {
    let s = settings(&MapTree::default());
    assert!(s.manage_foreign_rules && s.manage_foreign_routes);
    assert!(s.files.is_empty());
}

#[test]
fn drop_ins_are_read_in_name_order_and_etc_hides_usr() {
    let t = MapTree::default()
        .with(CONF, "[Network]\nManageForeignRoutes=no\n")
        .with(
            "/usr/lib/systemd/networkd.conf.d/10-vendor.conf",
            "[Network]\nManageForeignRoutingPolicyRules=no\nManageForeignRoutes=yes\n",
        )
        .with(
            "/run/systemd/networkd.conf.d/20-late.conf",
            "[Network]\nManageForeignRoutes=off\n",
        )
        .with(
            "/etc/systemd/networkd.conf.d/30-bad.conf",
            "[Network]\nManageForeignRoutingPolicyRules=perhaps\n",
        );
    let s = settings(&t);
    assert!(!s.manage_foreign_rules, "the vendor drop-in, not undone");
    assert!(
        !s.manage_foreign_routes,
        "20-late.conf comes after 10-vendor.conf"
    );
    assert_eq!(s.files.len(), 4);
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    // The same name in /etc hides the vendor's; an empty (masked) one hides it and says
    // nothing.
    let masked = MapTree::default()
        .with(
            "/usr/lib/systemd/networkd.conf.d/10-vendor.conf",
            "[Network]\nManageForeignRoutingPolicyRules=no\n",
        )
        .masked("/etc/systemd/networkd.conf.d/10-vendor.conf");
    assert!(settings(&masked).manage_foreign_rules);
}

#[test]
fn network_files_order_masking_drop_ins_and_match() {
    let t = MapTree::default()
        .with(
            "/usr/lib/systemd/network/10-eth.network",
            "[Match]\nName=eth*\n[Network]\nAddress=10.0.0.5/24\n",
        )
        .with(
            "/etc/systemd/network/05-veth.network",
            "[Match]\nName=veth0 !veth1\nKind=veth\n[Network]\nDHCP=no\nAddress=10.200.0.1/24\nKeepConfiguration=no\n[Address]\nAddress=10.201.0.1/24\nBroadcast=10.201.0.255\nLabel=veth0:x\n[Route]\nDestination=10.99.0.0/16\nGateway=10.200.0.254\n[RoutingPolicyRule]\nPriority=100\nFrom=10.244.1.0/24\nTable=77\n",
        )
        .with(
            "/etc/systemd/network/05-veth.network.d/50-keep.conf",
            "[Network]\nKeepConfiguration=static\n",
        )
        .with(
            "/usr/lib/systemd/network/05-veth.network.d/40-x.conf",
            "[Match]\nName=\nName=veth0\n",
        )
        .with("/usr/lib/systemd/network/90-nothing.network", "[Network]\nDHCP=yes\n")
        .with(
            "/usr/lib/systemd/network/80-container-host0.network",
            "[Match]\nVirtualization=container\nName=host0\n",
        )
        .masked("/etc/systemd/network/10-eth.network");
    let nets = networks(&t);
    let paths: Vec<&str> = nets.iter().map(|n| n.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/etc/systemd/network/05-veth.network",
            "/usr/lib/systemd/network/80-container-host0.network"
        ],
        "10-eth is masked, 90-nothing has no [Match]"
    );
    let veth = &nets[0];
    assert_eq!(veth.keep, Keep::Static, "the drop-in comes last");
    assert_eq!(veth.names, ["veth0"], "an empty Name= resets the list");
    assert_eq!(veth.dropins.len(), 2);
    assert_eq!(veth.addresses.len(), 2);
    assert_eq!(
        veth.addresses[1].compared_broadcast(),
        Some("10.201.0.255".parse().unwrap())
    );
    assert_eq!(veth.addresses[1].label.as_deref(), Some("veth0:x"));
    assert_eq!(veth.routes[0].table, None);
    assert_eq!(veth.rules[0].priority, Some(100));
    assert_eq!(network_for(&nets, &link("veth0")).0, Some(veth));
    assert_eq!(network_for(&nets, &link("veth2")).0, None);
    let (none, doubt) = network_for(&nets, &link("host0"));
    assert_eq!(none, None);
    assert_eq!(doubt.len(), 1, "Virtualization= is not evaluated");
}

#[test]
fn match_lists_follow_systemd() {
    let n = |names: &[&str]| Network {
        names: names.iter().map(|s| s.to_string()).collect(),
        ..Network::default()
    };
    let l = link("eth0");
    assert_eq!(n(&["eth*"]).fits(&l), Fit::Yes);
    assert_eq!(n(&["!eth0"]).fits(&l), Fit::No);
    assert_eq!(n(&["!wlan*"]).fits(&l), Fit::Yes, "only negative patterns");
    assert_eq!(n(&["wlan0", "!eth0"]).fits(&l), Fit::No);
    let mut alt = link("enp3s0");
    alt.altnames = vec!["eth0".into()];
    assert_eq!(
        n(&["eth0"]).fits(&alt),
        Fit::Yes,
        "alternative names match too"
    );
    let macs = Network {
        macs: vec!["02:00:00:00:00:01".into()],
        ..Network::default()
    };
    assert_eq!(macs.fits(&l), Fit::Yes);
    let mut other = l.clone();
    other.mac = Some("02:00:00:00:00:02".into());
    assert_eq!(macs.fits(&other), Fit::No);
    let driver = Network {
        drivers: vec!["virtio_net".into()],
        ..Network::default()
    };
    assert_eq!(driver.fits(&l), Fit::No);
}

#[test]
fn keep_configuration_values() {
    assert_eq!(Keep::parse("yes"), Some(Keep::Yes));
    assert_eq!(Keep::parse("false"), Some(Keep::No));
    assert_eq!(Keep::parse("static"), Some(Keep::Static));
    assert_eq!(Keep::parse("dhcp-on-stop"), Some(Keep::DhcpOnStop));
    assert_eq!(Keep::parse("sometimes"), None);
    assert!(Keep::Static.keeps_route_protocol(4));
    assert!(!Keep::Static.keeps_route_protocol(16));
    assert!(Keep::Yes.keeps_route_protocol(16));
    assert!(!Keep::DhcpOnStop.keeps_route_protocol(16));
    let t = MapTree::default().with(
        "/etc/systemd/network/10-a.network",
        "[Match]\nName=a\n[DHCPv4]\nCriticalConnection=yes\n",
    );
    assert_eq!(networks(&t)[0].keep, Keep::Yes);
}

#[test]
fn addresses_without_a_prefix_take_their_class() {
    assert_eq!(
        conf_address("10.1.2.3"),
        Some(("10.1.2.3".parse().unwrap(), 8))
    );
    assert_eq!(
        conf_address("172.16.0.1"),
        Some(("172.16.0.1".parse().unwrap(), 16))
    );
    assert_eq!(
        conf_address("fd00::1"),
        Some(("fd00::1".parse().unwrap(), 128))
    );
    assert_eq!(
        conf_address("10.1.2.3/24"),
        Some(("10.1.2.3".parse().unwrap(), 24))
    );
    assert_eq!(conf_address("nonsense"), None);
}

#[test]
fn values_networkd_ignores_are_warned_about_and_ignored() {
    let text = "[Match]\nName=a\n[Link]\nUnmanaged=perhaps\n[Network]\nKeepConfiguration=sometimes\nAddress=nonsense\nGateway=10.0.0.1\n";
    let n = network(&[(
        "/etc/systemd/network/10-a.network".into(),
        unit::parse(text),
    )]);
    assert_eq!(n.names, vec!["a"]);
    assert!(!n.unmanaged);
    assert_eq!(n.keep, Keep::No);
    assert!(n.addresses.is_empty());
    assert_eq!(n.routes.len(), 1, "the gateway is read");
    assert_eq!(
        n.warnings,
        vec![
            "/etc/systemd/network/10-a.network:4: Unmanaged=`perhaps`: not a boolean; ignored, as networkd ignores it",
            "/etc/systemd/network/10-a.network:6: KeepConfiguration=`sometimes`: not a KeepConfiguration= value; ignored, as networkd ignores it",
            "/etc/systemd/network/10-a.network:7: Address=`nonsense`: not an address; ignored, as networkd ignores it",
        ]
    );
}
