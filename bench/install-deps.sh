#!/usr/bin/env bash
# Finds or installs what `make bench` needs from Debian: dnsperf (the load), nsd (the
# authoritative upstream), dnsmasq and unbound (the servers compared), taskset (util-linux).
# dnsmasq comes from dnsmasq-base: the binary without the system service. A policy-rc.d keeps
# the packages' own services (unbound, nsd) from starting while they install; the benchmark
# starts its own instances on loopback.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v nsd >/dev/null || [ -x /usr/sbin/nsd ] || need+=(nsd)
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v unbound >/dev/null || [ -x /usr/sbin/unbound ] || need+=(unbound)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "bench: missing ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
  exit 1
fi
echo "bench: installing ${need[*]}"
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
