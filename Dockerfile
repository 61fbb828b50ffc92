# The sidecar, `otel-bridge serve`, as an image.
#
#   docker build -t otel-bridge:0.1.0 .
#   docker run -e PREFECT_API_URL -e PREFECT_API_KEY \
#     -e OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4317 -e OTEL_EXPORTER_OTLP_PROTOCOL=grpc \
#     -p 8686:8686 -v otel-bridge-state:/var/lib/otel-bridge otel-bridge:0.1.0
#
# Built from the wheel, on a slim Python, run as a non-root user, with the
# store on a volume. (The tests build and run the wheel; they cannot build
# this image: no container runtime is reachable where they run.)

FROM python:3.12-slim AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/otel-bridge otel-bridge \
    && mkdir -p /var/lib/otel-bridge && chown otel-bridge /var/lib/otel-bridge
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER otel-bridge
# Listen beyond the container's loopback (the endpoints need a token to take
# input: push_token, otlp_token); keep the store on the volume.
ENV OTEL_BRIDGE_LISTEN_HOST=0.0.0.0 \
    OTEL_BRIDGE_STORE_PATH=/var/lib/otel-bridge/store.sqlite3
VOLUME /var/lib/otel-bridge
EXPOSE 8686
HEALTHCHECK --interval=30s --timeout=5s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8686/healthz', timeout=4).status != 200)"
ENTRYPOINT ["otel-bridge"]
CMD ["serve"]
