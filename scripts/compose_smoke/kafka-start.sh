#!/bin/bash
# KAFKA_FOO_BAR=x becomes foo.bar=x (as in the official image), the log dir is formatted once with CLUSTER_ID,
# then the broker runs in the foreground.
set -euo pipefail
props=/opt/kafka/server.properties
: > "$props"
while IFS='=' read -r name value; do
    key=$(echo "${name#KAFKA_}" | tr '[:upper:]' '[:lower:]' | tr '_' '.')
    echo "$key=$value" >> "$props"
done < <(env | grep '^KAFKA_')
classpath="/opt/kafka/libs/*"
java -Xmx256m -cp "$classpath" kafka.tools.StorageTool format -t "$CLUSTER_ID" -c "$props" --ignore-formatted
exec java -Xmx512m -cp "$classpath" kafka.Kafka "$props"
