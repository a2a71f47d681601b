# dkv node image.
#
#   docker build -t dkv:local .
#   docker run --rm -p 7000:7000 -v dkv-data:/var/lib/dkv dkv:local      # standalone node
#   docker run --rm dkv:local serve --zk zk:2181/dkv --node-id n1 ...    # cluster mode
#
# Every `dkv serve` flag can also be given as a DKV_* environment variable.

# -- build: `pip install .` into /install --------------------------------------
# A compiler is needed only here: crcmod ships no wheels (its C extension
# speeds up the WAL checksums). plyvel, gevent, pyzmq and msgpack come as
# manylinux wheels (plyvel's bundles LevelDB). Both stages use the same base,
# so the installed tree (and the `dkv` script's interpreter path) carries over.
FROM python:3.11-slim AS build
ENV PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dkv ./dkv
RUN pip install --no-cache-dir --prefix=/install .

# -- runtime ----------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# dkv and its dependencies as installed above (no compiler in this image)
COPY --from=build /install /usr/local

RUN groupadd --system --gid 10001 dkv \
 && useradd --system --uid 10001 --gid dkv --home-dir /var/lib/dkv --shell /usr/sbin/nologin dkv \
 && mkdir -p /var/lib/dkv \
 && chown dkv:dkv /var/lib/dkv
# A named volume mounted here starts with this directory's owner (dkv).
VOLUME ["/var/lib/dkv"]
WORKDIR /var/lib/dkv
ENV DKV_DATA_DIR=/var/lib/dkv/data
USER dkv

EXPOSE 7000
# The node listens on the container's interface, so it needs auth (mount the
# directory from `dkv auth init`, owned by uid 10001, and set DKV_AUTH_DIR) or
# DKV_INSECURE=1 on a private network; publish the port on 127.0.0.1
# (docker run -p 127.0.0.1:7000:7000) unless auth is on.
# dkv stops cleanly on SIGTERM (queued writes finish, storage is checkpointed).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dkv"]
CMD ["serve", "--host", "0.0.0.0"]
