#!/bin/sh
# Prints the file-based SDS resource that holds the session-ticket keys of runnel's
# gateway: the content of the Secret runnel-gateway-ticket-keys (key sds.yaml), which
# every gateway replica mounts at /etc/runnel-ticket-keys (gateway-deployment.yaml).
#
#   sh deploy/istio/ticket-keys.sh > ticket-keys.yaml              # two fresh keys
#   sh deploy/istio/ticket-keys.sh old-ticket-keys.yaml > ticket-keys.yaml  # rotation
#
# The first key encrypts new tickets; both decrypt. With a previous file, its first key
# becomes the second one, so tickets issued before the rotation still resume.
#
# The keys are inline (base64, 80 random bytes each), not files beside this one: Envoy
# reloads the SDS file when the kubelet updates the mounted directory, but it applies an
# update only when the resource itself changes, and for session-ticket keys it does not
# look into files the resource names (TlsSessionTicketKeysSdsApi::getDataSourceFilenames
# returns none, envoyproxy/envoy source/common/secret/sds_api.cc). tests/resumption_replicas.rs
# runs this script, rotates with it, and checks that the replicas use the new keys.
set -eu

key() {
    openssl rand -base64 80 | tr -d '\n'
}

first=$(key)
if [ "$#" -ge 1 ]; then
    second=$(sed -n 's/^ *- inline_bytes: *//p' "$1" | head -n 1)
    if [ -z "$second" ]; then
        echo "ticket-keys.sh: no key in $1" >&2
        exit 1
    fi
else
    second=$(key)
fi

cat <<SDS
resources:
  - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
    name: runnel-session-ticket-keys
    session_ticket_keys:
      keys:
        - inline_bytes: $first
        - inline_bytes: $second
SDS
