# Stand-in for apache/kafka: Debian's Java 17 and the Kafka jars from Maven Central (devservers/install.sh
# fetches them; the smoke script adds kafka-tools), with the official image's env-to-properties start and the
# two scripts compose calls (kafka-topics.sh, kafka-broker-api-versions.sh).
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*
COPY libs/ /opt/kafka/libs/
COPY kafka-start.sh /opt/kafka/bin/kafka-start.sh
RUN printf '#!/bin/sh\nexec java -Xmx256m -cp "/opt/kafka/libs/*" org.apache.kafka.tools.TopicCommand "$@"\n' \
        > /opt/kafka/bin/kafka-topics.sh \
    && printf '#!/bin/sh\nexec java -Xmx256m -cp "/opt/kafka/libs/*" org.apache.kafka.tools.BrokerApiVersionsCommand "$@"\n' \
        > /opt/kafka/bin/kafka-broker-api-versions.sh \
    && chmod +x /opt/kafka/bin/*.sh
CMD ["/opt/kafka/bin/kafka-start.sh"]
