# A stand-in for python:3.11-slim-bookworm, made by scripts/image only when
# that image cannot be pulled: Debian's own Python 3.11 on the locally made
# Debian base (which carries this machine's trust store). Enough for the
# builder stage of ../../Dockerfile and for the example app image: python3
# with pip and venv, and the shared libpython PyInstaller needs.
ARG DEBIAN_IMAGE=kubelock-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates libpython3.11 python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python

# Debian marks its Python as externally managed; the python image's pip
# installs system-wide, so this one must too. The trust store is the one
# update-ca-certificates made, which includes the machine's own CAs.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
