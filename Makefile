# The two entry points an operator or CI needs. Both install what they use first (Debian/Ubuntu,
# as root): iproute2 for the kernel work, iptables and ipset for the chain and set protection,
# prometheus for promtool and the server the metrics tests scrape with, python3 for a test
# program that deletes rules over its own netlink socket (tests/deploy.rs,
# tests/observability.rs).
APT_PACKAGES := iproute2 iptables ipset prometheus python3
CARGO ?= cargo

.PHONY: deps demo test bench

deps:
	@if ! command -v ip >/dev/null || ! command -v iptables >/dev/null || ! command -v ipset >/dev/null \
		|| ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null || ! command -v python3 >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi

demo: deps
	$(CARGO) build --release --locked
	./target/release/netwarden demo

test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	$(CARGO) test --locked

bench: deps
	$(CARGO) bench --locked --bench repair
