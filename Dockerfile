# syntax=docker/dockerfile:1
# netwarden node agent image, for linux/amd64 and linux/arm64 from this one file.
#   build   — runs on the build machine's own platform ($BUILDPLATFORM) and cross-compiles for
#             the target's ($TARGETARCH): a pinned Rust toolchain, the locked dependency set, the
#             `dist` profile (release, symbols stripped). Cross-compiling needs the target's C
#             compiler and linker (ring, under rustls, compiles C and assembly), installed only
#             when the two architectures differ.
#   runtime — Debian 12 slim with only the tools the agent runs: iptables (both the nft and the
#             legacy backend, iptables-{nft,legacy}-{save,restore}: the agent picks the host's with
#             `--iptables-backend auto`, see docs/operator-guide.md), ipset and nftables
#             (`nft`, for the tables of spec.nftables).
# Build:
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/netwarden:0.1.0 --push .
#   docker build -t netwarden:0.1.0 .            # the machine's own architecture only
# The tag is Cargo.toml's version, which deploy/base's `images:` sets (tests/manifests.rs checks
# both, and this file statically: there is no container engine in CI).

FROM --platform=$BUILDPLATFORM rust:1.89-bookworm AS build
ARG TARGETARCH
ARG BUILDARCH
# Both cross toolchains' names, so that either direction works; a native build finds the
# machine's own gcc under the same name.
ENV CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc \
    CC_x86_64_unknown_linux_gnu=x86_64-linux-gnu-gcc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian's packages are not pinned (DL3008): bookworm's archive keeps only the current version of
# each, so a pin would break the build at its next security update.
# hadolint ignore=DL3008
RUN case "$TARGETARCH" in \
        amd64) triple="x86_64-unknown-linux-gnu"; gcc="gcc-x86-64-linux-gnu"; libc="libc6-dev-amd64-cross" ;; \
        arm64) triple="aarch64-unknown-linux-gnu"; gcc="gcc-aarch64-linux-gnu"; libc="libc6-dev-arm64-cross" ;; \
        *) echo "unsupported TARGETARCH '$TARGETARCH' (amd64, arm64)" >&2; exit 1 ;; \
    esac \
    && echo "$triple" > /target-triple \
    && if [ "$TARGETARCH" != "$BUILDARCH" ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            "$gcc" "$libc" \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && rustup target add "$triple"
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN triple="$(cat /target-triple)" \
    && cargo build --locked --profile dist --bin netwarden --target "$triple" \
    && install -D -m 0755 "target/$triple/dist/netwarden" /out/netwarden

FROM debian:bookworm-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iptables ipset nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/netwarden /usr/local/bin/netwarden
COPY deploy/entrypoint.sh /usr/local/bin/netwarden-entrypoint
# root inside the container, but with only NET_ADMIN and NET_RAW (netlink, iptables-restore,
# ipset, iptables-legacy) and SYS_PTRACE and DAC_READ_SEARCH (naming who removed an object): the
# DaemonSet drops every other capability, and Kubernetes cannot hand capabilities to a non-root
# process (no ambient capabilities). The root filesystem is read-only;
# the agent writes only its state file (hostPath /var/lib/netwarden) and /run/xtables.lock.
# hadolint ignore=DL3002
USER 0:0
EXPOSE 10370
ENTRYPOINT ["/usr/local/bin/netwarden-entrypoint"]
# The ConfigMap `netwarden` of the pod's own namespace (POD_NAMESPACE, from the downward API).
CMD ["run", "--configmap", "netwarden"]
