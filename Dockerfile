# syntax=docker/dockerfile:1
# fastgw container: stage 1 compiles the Cython extensions into a wheel (plus wheels of its dependencies);
# stage 2 is a slim Python with only those wheels installed, run as a non-root user.
#
#   docker build -t fastgw .
#   docker run --rm -p 8080:8080 -e FASTGW_CONFIG= fastgw            # demo: the built-in mock upstream
#   docker run --rm -p 8080:8080 -v "$PWD/deploy:/etc/fastgw:ro" -e OPENAI_API_KEY fastgw
#
# /etc/fastgw holds fastgw.toml (and the policies/ folder it names); FASTGW_* variables override the file.
# Give `docker stop -t` / ECS stopTimeout / terminationGracePeriodSeconds more than drain_timeout +
# shutdown_delay, or in-flight streams are cut. See docs/operations.md.
# The commands of both stages are run outside Docker by tests/integration/test_wheel_and_docker.py.

FROM python:3.12-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the wheel needs (.dockerignore is an allow-list too), so edits to tests do not rebuild.
COPY pyproject.toml setup.py README.md ./
COPY fastgw/ fastgw/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FASTGW_CONFIG=/etc/fastgw/fastgw.toml \
    FASTGW_HOST=0.0.0.0 \
    FASTGW_PORT=8080 \
    FASTGW_ADMIN_HOST=0.0.0.0 \
    FASTGW_ADMIN_PORT=9901 \
    FASTGW_ACCESS_LOG=-
# The wheels are bind-mounted from stage 1, not copied, so they leave no layer behind.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/fastgw-*.whl \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fastgw \
    && mkdir -p /etc/fastgw
USER 10001
# 8080: the API (the NLB's target group). 9901: the read-only admin status; keep it inside the VPC.
EXPOSE 8080 9901
# Asks the admin listener, which never needs a PROXY header (the API port may require one).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ['FASTGW_ADMIN_PORT'], timeout=2)"]
# SIGTERM: /readyz turns 503, then streams drain within drain_timeout. SIGHUP reloads the config.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fastgw"]
CMD ["serve"]
