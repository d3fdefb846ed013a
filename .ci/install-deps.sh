#!/usr/bin/env bash
# Finds or installs the Debian packages that `make test` and the benchmarks need.
#   bash .ci/install-deps.sh [--dry-run] NAME COMMAND=PACKAGE...
# e.g. `test nsd=nsd dig=dnsutils promtool=prometheus ip=iproute2`. A command is taken as
# installed when found on DEPS_PATH (default: PATH, then /usr/sbin and /sbin, where nsd and ip
# live for users whose PATH lacks them). As root with apt-get the missing packages are installed;
# otherwise the script stops at once with one line naming them. --dry-run only says what it
# would install. A policy-rc.d keeps the packages' own services (nsd, prometheus, unbound) from
# starting while they install: the tests and benchmarks start their own instances.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
dry_run=0
if [ "${1:-}" = --dry-run ]; then
  dry_run=1
  shift
fi
name=$1
shift
search_path=${DEPS_PATH:-$PATH:/usr/sbin:/sbin}
need_cmds=()
need_pkgs=()
for pair in "$@"; do
  cmd=${pair%%=*}
  pkg=${pair#*=}
  if ! PATH=$search_path command -v "$cmd" >/dev/null; then
    need_cmds+=("$cmd")
    need_pkgs+=("$pkg")
  fi
done
if [ ${#need_pkgs[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "$name: missing ${need_cmds[*]}: install as root: apt-get install ${need_pkgs[*]}" >&2
  exit 1
fi
if [ "$dry_run" = 1 ]; then
  echo "$name: missing ${need_cmds[*]}: would run apt-get install ${need_pkgs[*]}"
  exit 0
fi
echo "$name: installing ${need_pkgs[*]}"
apt-get update -qq
made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  made_policy=1
fi
status=0
apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null || status=$?
if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
exit "$status"
