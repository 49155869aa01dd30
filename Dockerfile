# syntax=docker/dockerfile:1
#
# The kube-ebpf-proxy image, for deploy/kube-ebpf-proxy.yaml:
#
#   docker build -t registry.example.com/kube-ebpf-proxy:0.1.0 .
#
# One statically linked binary (musl) and a CA bundle in an otherwise empty
# image: no shell, no libc, no package manager.
#
# `cargo xtask image` builds the same image on machines without a registry
# (xtask/src/image.rs): the daemon with the very cargo command of the build
# stage below, then the runtime stage (from the last FROM on) with buildah,
# taking the binary from its build context instead of the build stage. A
# test of xtask checks that the two say the same; a lab test runs that image
# with podman as the DaemonSet runs it (tests/tests/image.rs). The build
# stage itself was NOT run here: it pulls rust:bookworm, and no registry is
# reachable from the development machines. It repeats what `cargo xtask
# setup` (xtask/src/setup.rs) does there, on the same Debian release
# (bookworm): rust-src for the nightly toolchain, the musl target and
# musl-tools, and bpf-linker linked against the libLLVM that ships inside
# that nightly (Debian has no LLVM of the version rustc uses).
#
# Toolchains: stable for the daemon (rust-version 1.95, from Cargo.toml),
# nightly for the eBPF programs (proxy-userspace/build.rs builds
# proxy-ebpf with `rustup run nightly`, -Z build-std=core). Like `cargo
# xtask setup`, this takes the nightly of the day; the combination tested is
# rustc 1.97.0-nightly (2026-05-19, LLVM 22) with bpf-linker 0.13.0. A
# later nightly whose LLVM major bpf-linker 0.13 does not support fails in
# the bpf-linker step with "feature llvm-NN not found".

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
ARG BPF_LINKER_VERSION=0.13.0
ENV CARGO_TERM_COLOR=never

# The nightly toolchain, with the sources of `core` for -Z build-std.
RUN rustup toolchain install nightly --profile minimal --component rust-src

# The static daemon: the musl target, and musl-gcc for ring's C and
# assembly.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends musl-tools; \
    rm -rf /var/lib/apt/lists/*; \
    rustup target add x86_64-unknown-linux-musl

# bpf-linker, linked against the nightly's own libLLVM: its build looks for
# libLLVM.so under $LLVM_PREFIX/lib, and the binary's rpath then needs the
# versioned soname there too (as xtask/src/setup.rs does).
RUN set -eux; \
    sysroot="$(rustc +nightly --print sysroot)"; \
    soname="$(basename "$(ls "$sysroot"/lib/libLLVM.so.* | head -n 1)")"; \
    major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"; \
    mkdir -p /opt/llvm/lib; \
    ln -s "$sysroot/lib/$soname" /opt/llvm/lib/libLLVM.so; \
    ln -s "$sysroot/lib/$soname" "/opt/llvm/lib/$soname"; \
    LLVM_PREFIX=/opt/llvm cargo +nightly install bpf-linker \
        --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-$major"; \
    bpf-linker --version

WORKDIR /src
COPY . .
# The daemon only (the eBPF object is built by its build.rs and embedded in
# the binary), statically linked. Cargo.lock pins every crate: --locked.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    cargo build --release --locked -p proxy-userspace --bin kube-ebpf-proxy --target x86_64-unknown-linux-musl; \
    install -D -m 0755 target/x86_64-unknown-linux-musl/release/kube-ebpf-proxy /out/kube-ebpf-proxy

# The runtime stage (`cargo xtask image` builds exactly this part). The
# daemon reads one file of the image: the CA bundle, which kube's TLS setup
# loads when a kubeconfig names no CA (in-cluster, the ServiceAccount's CA
# is used). It writes nothing: the DaemonSet's readOnlyRootFilesystem
# holds (pins go to the mounted bpffs).
FROM scratch
LABEL org.opencontainers.image.title="kube-ebpf-proxy" \
      org.opencontainers.image.description="A kube-proxy replacement with an eBPF datapath" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /out/kube-ebpf-proxy /usr/local/bin/kube-ebpf-proxy
# Root, with only the capabilities the DaemonSet adds (see
# deploy/kube-ebpf-proxy.yaml): added capabilities are not effective for
# another uid in Kubernetes.
USER 0
ENTRYPOINT ["/usr/local/bin/kube-ebpf-proxy"]
CMD ["--help"]
