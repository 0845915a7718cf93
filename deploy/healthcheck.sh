#!/bin/bash
# Container health check for preagg-proxy: GET /healthz on the admin listener and succeed on 200.
#
# The runtime image is debian:bookworm-slim with nothing added but ca-certificates, so there is no
# curl or wget; bash (essential in every Debian image) opens the TCP connection itself through its
# /dev/tcp redirection. The admin address is read from PREAGG_ADMIN_LISTEN, the variable the image
# sets; if you move the admin listener with --admin-listen or a config file instead, set the
# variable too (or override HEALTHCHECK). A wildcard bind address is checked on loopback.
#
# Exit status: 0 healthy, 1 anything else (no listener, no answer within 5s, a status other than 200).
set -u

addr=${PREAGG_ADMIN_LISTEN:-127.0.0.1:8125}
port=${addr##*:}
host=${addr%:*}
host=${host#[}
host=${host%]}
case $host in
    "" | 0.0.0.0 | ::) host=127.0.0.1 ;;
esac

if ! { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null; then
    echo "healthcheck: cannot connect to $host:$port" >&2
    exit 1
fi
printf 'GET /healthz HTTP/1.0\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$host" "$port" >&3
status=
IFS= read -r -t 5 status <&3
exec 3<&-
case $status in
    "HTTP/1."?" 200"*) exit 0 ;;
esac
echo "healthcheck: GET http://$host:$port/healthz answered '${status%$'\r'}'" >&2
exit 1
