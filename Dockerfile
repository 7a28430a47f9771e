# syntax=docker/dockerfile:1
#
# runnel's image: one static binary on scratch, nothing else.
#
#   docker build --platform linux/amd64 \
#     --build-arg RUNNEL_BUILD_COMMIT="$(git rev-parse HEAD)" -t runnel .
#
# Cloud Run runs linux/amd64 only, so the builder targets x86_64 (on an arm64 machine
# the --platform flag above runs the builder under emulation).
#
# Why a static glibc binary and not musl: runnel resolves DNS names with a pure-Rust
# resolver (hickory-resolver, reading /etc/resolv.conf and /etc/hosts), so it needs no
# NSS modules and therefore nothing from a libc at run time; glibc's allocator holds up
# under many threads where musl's is known to slow down; and this builder is the same
# Debian 12 toolchain the test suite uses (tests/static_binary.rs builds the binary with
# exactly the command below and runs it in an empty root directory). musl remains an
# option: add `rustup target add x86_64-unknown-linux-musl`, install musl-tools, and
# build with `--target x86_64-unknown-linux-musl` (aws-lc-sys builds with musl-gcc).

# Builder: the official Rust image, pinned to the toolchain the project is tested with.
# Pin it by digest as well (rust:1.95.0-slim-bookworm@sha256:...) for reproducible builds.
FROM rust:1.95.0-slim-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# The build environment every build shares (AWS_LC_SYS_NO_JITTER_ENTROPY, see there).
COPY .cargo/config.toml ./.cargo/
COPY src ./src
# Read at compile time by option_env!("RUNNEL_BUILD_COMMIT") for runnel_build_info.
ARG RUNNEL_BUILD_COMMIT=unknown
ENV RUNNEL_BUILD_COMMIT=${RUNNEL_BUILD_COMMIT}
# +crt-static links glibc statically (a static-pie binary, no program interpreter).
# --target is what makes that safe: with an explicit target, RUSTFLAGS apply only to
# the target's artefacts, not to build scripts and proc-macros, which must stay dynamic.
# getrandom_backend="linux_getrandom": the getrandom crate (behind the resolver's query
# ids) finds glibc's getrandom() with dlsym, which a static binary cannot do, and then
# falls back to opening /dev/urandom; this cfg makes it call getrandom() directly, so
# the binary needs no /dev at all (Linux >= 3.17).
# The cache mounts keep the registry and the target directory between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom"' \
    cargo build --release --locked --target x86_64-unknown-linux-gnu \
    && cp target/x86_64-unknown-linux-gnu/release/runnel /runnel

# Runtime: scratch, the binary and nothing else. runnel needs no CA bundle (its trust
# anchors come from RUNNEL_TLS_CA_*), no time zone data (it logs UTC), no /etc/passwd
# (the user is given by number) and no /tmp; Cloud Run provides /etc/resolv.conf and
# /etc/hosts. distroless/static-debian12:nonroot also works and adds about 2 MiB.
FROM scratch
ARG RUNNEL_VERSION=0.1.0
ARG RUNNEL_BUILD_COMMIT=unknown
LABEL org.opencontainers.image.title="runnel" \
      org.opencontainers.image.description="A layer-4 tunnel for Cloud Run: plaintext TCP downstream on \$PORT, mutual TLS upstream to a private Istio ingress gateway" \
      org.opencontainers.image.version="${RUNNEL_VERSION}" \
      org.opencontainers.image.revision="${RUNNEL_BUILD_COMMIT}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="scratch"
COPY --link --from=builder /runnel /runnel
# Fails the build if the binary needs anything the image does not have (a dynamic
# loader, a shared library): this image has neither.
RUN ["/runnel", "--version"]
# A non-root user by number (distroless's "nonroot"), so runAsNonRoot can check it.
USER 65532:65532
# 8080: Cloud Run's $PORT (downstream). 9090: RUNNEL_METRICS_ADDR (/metrics, /healthz,
# /readyz), which must never be $PORT.
EXPOSE 8080 9090
ENTRYPOINT ["/runnel"]
