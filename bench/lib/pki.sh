# shellcheck shell=bash
# Throwaway PKI for one run: a CA, the gateway's certificate and the tunnel's client
# certificate. Every tunnel uses the same files, so every tunnel does the same handshake.
#
# Keys are P-256 (ECDSA), like Istio's; SANs are what the tunnels verify:
#   gateway: DNS gateway.runnel.test + IP 127.0.0.1
#   client:  URI spiffe://cluster.local/ns/runnel/sa/runnel (the gateway checks it)

GATEWAY_NAME=gateway.runnel.test
CLIENT_SPIFFE=spiffe://cluster.local/ns/runnel/sa/runnel

make_pki() {
    local dir=$WORK/pki
    mkdir -p "$dir"
    (
        cd "$dir" || exit 1
        set -e
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "/CN=runnel bench CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem

        issue() { # issue NAME SUBJECT EXTFILE-LINES...
            local name=$1 subj=$2
            shift 2
            printf '%s\n' "$@" >"$name.ext"
            openssl ecparam -name prime256v1 -genkey -noout -out "$name.sec1.key"
            # PKCS#8, the form every tunnel here reads.
            openssl pkcs8 -topk8 -nocrypt -in "$name.sec1.key" -out "$name.key"
            openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr"
            openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
                -days 365 -sha256 -extfile "$name.ext" -out "$name.pem"
            cat "$name.pem" "$name.key" >"$name.bundle.pem" # HAProxy's `crt` wants both
        }
        issue gateway "/CN=$GATEWAY_NAME" \
            "subjectAltName=DNS:$GATEWAY_NAME,IP:127.0.0.1" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth"
        issue client "/O=runnel" \
            "subjectAltName=URI:$CLIENT_SPIFFE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=clientAuth"
        chmod 600 ./*.key
    ) >>"$WORK/logs/pki.log" 2>&1 || die "PKI generation failed (see $WORK/logs/pki.log)"

    export PKI_DIR=$dir GATEWAY_NAME CLIENT_SPIFFE
    export CA_PEM=$dir/ca.pem
    export GW_CERT=$dir/gateway.pem GW_KEY=$dir/gateway.key
    export CLIENT_CERT=$dir/client.pem CLIENT_KEY=$dir/client.key
    export CLIENT_BUNDLE=$dir/client.bundle.pem
}
