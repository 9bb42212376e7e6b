# A Kafka-protocol broker image for machines that cannot pull apache/kafka:
# Tansu (https://github.com/tansu-io/tansu, Apache-2.0), the static binary that
# scripts/install-deps.sh puts at .tools/bin/tansu. Used only by
# docker/compose.tansu.yml (the end-to-end test); users run Apache Kafka.
#
#   docker build -f docker/local/tansu.Dockerfile --build-arg BASE_IMAGE=pgrelay-base:bookworm \
#       -t pgrelay-tansu:local DIR        # DIR holds the tansu binary
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
COPY tansu /usr/local/bin/tansu
USER nobody
EXPOSE 9092
ENTRYPOINT ["tansu"]
CMD ["broker", "--listener-url", "tcp://0.0.0.0:9092", "--storage-engine", "memory://tansu/"]
