# A stand-in for gcr.io/distroless/cc-debian12:nonroot, made by scripts/image
# only when that image cannot be pulled: the files of the same Debian
# packages (glibc, libgcc, libstdc++, OpenSSL, zlib, CA certificates, time
# zones) in an otherwise empty image, with distroless's usr-merge links, its
# users (nonroot is 65532), /home/nonroot and a world-writable /tmp.
ARG DEBIAN_IMAGE=kubelock-standin/debian:bookworm
FROM ${DEBIAN_IMAGE} AS files

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates libgcc-s1 libssl3 libstdc++6 tzdata zlib1g \
    && rm -rf /var/lib/apt/lists/*

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /rootfs
RUN mkdir -p usr/bin usr/sbin usr/lib usr/lib64 etc home/nonroot root tmp \
    && ln -s usr/bin bin && ln -s usr/sbin sbin && ln -s usr/lib lib && ln -s usr/lib64 lib64 \
    && { dpkg -L base-files libc6 libgcc-s1 libstdc++6 libssl3 zlib1g ca-certificates tzdata; \
        echo /etc/ssl/certs/ca-certificates.crt; } \
        | sed -n 's|^/\(.\)|\1|p' | sort -u \
        | tar -C / -c --no-recursion -T - \
        | tar -C /rootfs -x --keep-directory-symlink \
    && printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
        'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >etc/passwd \
    && printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >etc/group \
    && chown 65532:65532 home/nonroot && chmod 700 root && chmod 1777 tmp \
    && rm -rf usr/share/doc usr/share/man usr/share/lintian

FROM scratch
COPY --from=files /rootfs /
USER 65532:65532
WORKDIR /home/nonroot
