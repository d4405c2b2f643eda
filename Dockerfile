# kubelock in an image that holds nothing else, in two layouts:
#
#   /usr/local/bin/kubelock    one self-contained file, for other images:
#                              COPY --from=kubelock /usr/local/bin/kubelock /usr/local/bin/
#   /usr/local/lib/kubelock/   the same program as a folder: the entrypoint, and
#                              `kubelock` on this image's PATH
#
#   scripts/image      (`just image`: kubelock:dev; stand-in bases when no registry)
#   docker build -t kubelock .
#   docker build --build-arg VARIANT=with-kubernetes -t kubelock:kubeconfig .
#
# Why two: the one-file executable unpacks itself into $TMPDIR (default /tmp)
# at every start, so it needs a writable /tmp that allows executing mapped
# libraries; with readOnlyRootFilesystem and no exec-able /tmp volume it fails
# ("failed to map segment from shared object"). The folder unpacks nothing:
# this image runs on a read-only root with no /tmp volume, starts faster, and
# kubelock itself is PID 1 (it reaps orphans). The file stays for COPY --from
# into glibc-based images (Debian, Ubuntu, UBI, distroless/cc; not Alpine),
# where /tmp is the copying image's affair. Cost: ~25 MB more on disk.
#
# VARIANT=without-kubernetes (default) reads only the in-cluster configuration
# (a Pod's ServiceAccount); with-kubernetes also reads kubeconfig files, at the
# cost of ~11 MB per layout. The build steps are scripts/build-executable's,
# the same that CI runs and tests.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${PYTHON_IMAGE} AS builder

# gcc and libc6-dev build PyInstaller's bootloader (with zlib linked in);
# binutils is what PyInstaller inspects and strips libraries with.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --no-cache-dir uv==0.13.9

WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY src ./src
COPY scripts/build-executable ./scripts/

ARG VARIANT=without-kubernetes
ENV UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy
RUN --mount=type=cache,target=/root/.cache/uv \
    scripts/build-executable --${VARIANT} --output /out/kubelock \
    && scripts/build-executable --${VARIANT} --onedir --output /out/lib/kubelock \
    && /out/kubelock --version && /out/lib/kubelock/kubelock --version

FROM ${RUNTIME_IMAGE}

LABEL org.opencontainers.image.title="kubelock" \
      org.opencontainers.image.description="Run a command while holding a lock kept in the Kubernetes API" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/kubelock /usr/local/bin/kubelock
COPY --from=builder /out/lib/kubelock /usr/local/lib/kubelock

# TMPDIR: where the one-file executable unpacks itself (an emptyDir there
# when the root filesystem is read-only). The CA bundle: for kubeconfigs that
# rely on the system's certificate authorities (in a Pod, the ServiceAccount's
# ca.crt is used). PATH: `command: ["kubelock", ...]` runs the folder layout.
ENV TMPDIR=/tmp \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PATH=/usr/local/lib/kubelock:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER 65532:65532
ENTRYPOINT ["/usr/local/lib/kubelock/kubelock"]
CMD ["--help"]
