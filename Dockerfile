# syntax=docker/dockerfile:1
# Container images of the taskbus binaries with Docker, Podman or any BuildKit builder, one
# target per image:
#
#   docker build --target taskbus-coordinator -t registry.example.com/taskbus-coordinator:0.1.0 .
#
# Targets: taskbus, taskbus-coordinator, taskbus-agent, taskbus-ledger, taskbus-scaler,
# taskbus-gpu-dispatcher. Each image's files come from `cargo xtask image --rootfs`, which
# writes the same files as the OCI layouts of `cargo xtask image` (the way to build images
# without a container engine; docs/DEPLOY.md, "Container images"). The tests hold the targets
# below to the images xtask writes (user, environment, working directory, entrypoint, ports)
# and build two of them with buildah, with the compile stage replaced by xtask's files: the
# compile stage needs the rust image, which the test machines cannot pull.

FROM docker.io/library/rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# File times and the images' `created` label (seconds since 1970); unset means 1970.
ARG SOURCE_DATE_EPOCH
RUN cargo build --release --locked --bins \
 && cargo xtask image --bin-dir target/release --rootfs /rootfs

FROM scratch AS base
USER 65532:65532
WORKDIR /home/nonroot
ENV PATH=/usr/local/bin:/usr/bin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt

FROM base AS taskbus
COPY --from=build /rootfs/taskbus/ /
ENTRYPOINT ["/usr/local/bin/taskbus"]

FROM base AS taskbus-coordinator
COPY --from=build /rootfs/taskbus-coordinator/ /
EXPOSE 9464/tcp
ENTRYPOINT ["/usr/local/bin/taskbus-coordinator"]

FROM base AS taskbus-agent
COPY --from=build /rootfs/taskbus-agent/ /
EXPOSE 9467/tcp
ENTRYPOINT ["/usr/local/bin/taskbus-agent"]

FROM base AS taskbus-ledger
COPY --from=build /rootfs/taskbus-ledger/ /
EXPOSE 9466/tcp
ENTRYPOINT ["/usr/local/bin/taskbus-ledger"]

FROM base AS taskbus-scaler
COPY --from=build /rootfs/taskbus-scaler/ /
EXPOSE 9090/tcp 9465/tcp
ENTRYPOINT ["/usr/local/bin/taskbus-scaler"]

FROM base AS taskbus-gpu-dispatcher
COPY --from=build /rootfs/taskbus-gpu-dispatcher/ /
EXPOSE 9467/tcp
ENTRYPOINT ["/usr/local/bin/taskbus-gpu-dispatcher"]
