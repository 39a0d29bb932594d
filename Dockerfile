# Multi-stage build: compile in the Rust image, run from a small Debian base as a
# non-root user. Only the two binaries and the CA bundle reach the final image.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# make builds jemalloc, the gateway's allocator.
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY config ./config
RUN mkdir -p src/bin && echo 'fn main() {}' > src/main.rs && echo 'fn main() {}' > src/bin/mock_llm.rs \
    && echo '' > src/lib.rs && cargo build --release --locked && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs src/bin/mock_llm.rs && cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /src/target/release/llm-gateway /src/target/release/mock-llm /usr/local/bin/
USER 10001:10001
ENV HOST=0.0.0.0 PORT=8000 LOG_FORMAT=json
EXPOSE 8000
# No curl in the slim image: bash's /dev/tcp sends a plain GET /health.
HEALTHCHECK --interval=10s --timeout=2s --retries=3 CMD ["/bin/bash", "-c", \
    "exec 3<>/dev/tcp/127.0.0.1/${PORT:-8000} && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '\"ok\"' <&3"]
ENTRYPOINT ["/usr/local/bin/llm-gateway"]
