# netwarden node agent image (issue 6). Two stages:
#   build   — a pinned Rust toolchain builds the release binary from the locked dependency set;
#   runtime — Debian 12 slim with the tools the agent runs: iptables (both the nft and the legacy
#             backend: the agent picks the host's with `--iptables-backend auto`, see
#             docs/operator-guide.md), ipset and iproute2.
# Build: docker build -t netwarden:0.1.0 .
# tests/manifests.rs checks this file statically (no container engine in CI).

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin netwarden \
    && install -D -m 0755 target/release/netwarden /out/netwarden

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iptables ipset iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/netwarden /usr/local/bin/netwarden
COPY deploy/entrypoint.sh /usr/local/bin/netwarden-entrypoint
# root inside the container, but with only NET_ADMIN and NET_RAW (the DaemonSet drops every other
# capability): netlink, iptables-restore and ipset need them, and Kubernetes cannot hand
# capabilities to a non-root process (no ambient capabilities). The root filesystem is read-only;
# the agent writes only its state file (hostPath /var/lib/netwarden) and /run/xtables.lock.
USER 0:0
EXPOSE 10370
ENTRYPOINT ["/usr/local/bin/netwarden-entrypoint"]
CMD ["run", "--configmap", "netwarden/netwarden"]
