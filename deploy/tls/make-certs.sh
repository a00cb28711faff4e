#!/bin/sh
# Make a private CA and server + client certificates for trying TLS (DICOM and HTTPS).
# Production: use certificates from the hospital's PKI instead.
#   deploy/tls/make-certs.sh deploy/tls/certs drh-pacs.example.org
set -eu
out=${1:-certs}
name=${2:-drh-pacs.example.org}
mkdir -p "$out"
cd "$out"
umask 077
openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=drh-pacs test CA" \
    -keyout ca.key -out ca.crt
openssl req -newkey rsa:3072 -nodes -subj "/CN=$name" -keyout server.key -out server.csr
printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$name" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
    -extfile server.ext -out server.crt
openssl req -newkey rsa:3072 -nodes -subj "/CN=viewer" -keyout client.key -out client.csr
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
    -extfile client.ext -out client.crt
rm -f ./*.csr ./*.ext ca.srl
chmod 644 ca.crt server.crt client.crt
echo "made ca.crt, server.crt/key, client.crt/key in $(pwd)"
