# kubelock as one executable, in an image that holds nothing else.
#
#   docker build -t kubelock .                                  (`just image`)
#   docker build --build-arg VARIANT=with-kubernetes -t kubelock:kubeconfig .
#
# Use the image as an init container's image, or copy the executable into
# your own glibc-based image (Debian, Ubuntu, UBI, distroless/cc; not Alpine):
#
#   COPY --from=kubelock /usr/local/bin/kubelock /usr/local/bin/
#
# The executable unpacks itself into $TMPDIR (default /tmp) at every start and
# cleans up at exit: with readOnlyRootFilesystem, mount an emptyDir at /tmp.
#
# VARIANT=without-kubernetes (default) reads only the in-cluster configuration
# (a Pod's ServiceAccount); with-kubernetes also reads kubeconfig files, at the
# cost of ~11 MB. The build steps are scripts/build-executable's, the same
# that CI runs and tests.

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
    && /out/kubelock --version

FROM ${RUNTIME_IMAGE}

LABEL org.opencontainers.image.title="kubelock" \
      org.opencontainers.image.description="Run a command while holding a lock kept in the Kubernetes API" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/kubelock /usr/local/bin/kubelock

# Where the executable unpacks itself: mount an emptyDir here when the root
# filesystem is read-only. The CA bundle: for kubeconfigs that rely on the
# system's certificate authorities (in a Pod, the ServiceAccount's ca.crt is used).
ENV TMPDIR=/tmp \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubelock"]
CMD ["--help"]
