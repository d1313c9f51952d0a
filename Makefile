# The two entry points an operator or CI needs. Both install what they use first (Debian/Ubuntu,
# as root): iproute2 for the kernel work, iptables and ipset for the chain and set protection.
APT_PACKAGES := iproute2 iptables ipset
CARGO ?= cargo

.PHONY: deps demo test bench

deps:
	@if ! command -v ip >/dev/null || ! command -v iptables >/dev/null || ! command -v ipset >/dev/null; then \
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
