#!/usr/bin/env bash
# Finds or installs the Debian packages a benchmark needs.
#   bash bench/install-deps.sh NAME COMMAND=PACKAGE...
# e.g. `bench dnsperf=dnsperf nsd=nsd dnsmasq=dnsmasq-base unbound=unbound taskset=util-linux`.
# A command found on PATH or in /usr/sbin is taken as installed. dnsmasq comes from dnsmasq-base:
# the binary without the system service. A policy-rc.d keeps the packages' own services (unbound,
# nsd) from starting while they install; the benchmarks start their own instances.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
name=$1
shift
need=()
for pair in "$@"; do
  cmd=${pair%%=*}
  pkg=${pair#*=}
  command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "$name: missing ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
  exit 1
fi
echo "$name: installing ${need[*]}"
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
