#!/usr/bin/env bash
# Finds or installs what `make bench-discovery` needs from Debian: nsd (the upstream), dnsmasq
# (from dnsmasq-base: the binary without the system service), iproute2 (network namespaces).
# A policy-rc.d keeps a package's own service (nsd's) from starting while it installs; the
# benchmark starts its own instances inside its namespaces.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
command -v nsd >/dev/null || [ -x /usr/sbin/nsd ] || need+=(nsd)
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need+=(iproute2)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "bench-discovery: missing ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
  exit 1
fi
echo "bench-discovery: installing ${need[*]}"
apt-get update -qq
made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  made_policy=1
fi
status=0
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || status=$?
if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
exit "$status"
