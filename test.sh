#!/usr/bin/env bash
# The test suite, as the README says to run it and CI (.ci/run) runs it:
#
#   sudo ./test.sh                   # every package
#   sudo ./test.sh -run TestChaos .  # arguments replace ./..., as go test's
#
# Root, because the tests build network namespaces (never touching the
# machine's own). First it installs with apt-get, only if missing, what the
# tests need beyond Go:
#
#   gcc, libc6-dev  the race detector: go test -race builds with cgo
#   ca-certificates go's module downloads, over HTTPS
#   iproute2        ip, which the test lab's own test runs (ip netns add/del)
#   iptables        the iptables rule backend, which its tests run
#   frr             bgpd and zebra, the router of the multi-host BGP test,
#                   started in its lab namespace only (no service is
#                   started on install)
#   chromium        the headless browser of the status page's tests and of
#                   internal/browser (pages driven across a deploy)
#
# and, with IPCLUSTER_BENCH_TOOLS=1 (as CI sets), haproxy too, which the
# data-path benchmark (go run ./bench/datapath) compares with. Then it runs
#
#   go test -race -count=1 -timeout 15m ./...
#
# with IPCLUSTER_REQUIRE_NETNS=1 and IPCLUSTER_REQUIRE_TOOLS=1, so that a
# test that cannot build its namespaces or find its program fails instead
# of skipping. (A plain go test skips those tests instead, naming the
# package to install.)
set -euo pipefail

cd "$(dirname "$0")"

die() {
	echo "test.sh: $*" >&2
	exit 1
}

[[ $EUID -eq 0 ]] || die "run me as root (sudo ./test.sh): the tests build network namespaces, and apt-get installs what they need"

# sudo resets PATH, which then lacks Go's usual places.
if ! command -v go >/dev/null; then
	for dir in /usr/local/go/bin /usr/lib/go/bin; do
		if [[ -x $dir/go ]]; then
			PATH="$PATH:$dir"
			break
		fi
	done
fi
command -v go >/dev/null || die "go not found on PATH (sudo resets it): run sudo env PATH=\"\$PATH\" ./test.sh"

have() {
	local bin
	for bin in "$@"; do
		command -v "$bin" >/dev/null || return 1
	done
}

check() { # fills packages and reasons with what is missing
	packages=()
	reasons=()
	local cc
	cc="$(go env CC)"
	want gcc "the race detector (go test -race builds with cgo)" "${cc%% *}"
	if [[ ! -e /usr/include/stdlib.h ]]; then
		packages+=(libc6-dev)
		reasons+=("libc6-dev: the C headers the race detector's cgo build needs")
	fi
	if [[ ! -e /etc/ssl/certs/ca-certificates.crt ]]; then
		packages+=(ca-certificates)
		reasons+=("ca-certificates: go's module downloads, over HTTPS")
	fi
	want iproute2 "ip, run by the test lab's own test" ip
	want iptables "the iptables rule backend and its tests" \
		iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore
	if ! have chromium && ! have chromium-browser && ! have google-chrome; then
		packages+=(chromium)
		reasons+=("chromium: the headless browser of the status page's tests and of internal/browser")
	fi
	if [[ ! -x /usr/lib/frr/bgpd ]] || ! have vtysh; then
		packages+=(frr)
		reasons+=("frr: bgpd and zebra, the router of the multi-host BGP test (run in its namespace only)")
	fi
	if [[ ${IPCLUSTER_BENCH_TOOLS:-} == 1 ]]; then
		want haproxy "the data-path benchmark's HAProxy comparison" haproxy
	fi
}
want() { # package, why, then the programs it provides (all needed)
	local pkg=$1 why=$2
	shift 2
	if ! have "$@"; then
		packages+=("$pkg")
		reasons+=("$pkg: $why")
	fi
}

check
if ((${#packages[@]})); then
	command -v apt-get >/dev/null ||
		die "missing, and no apt-get to install them: ${reasons[*]}"
	echo "test.sh: installing what the tests need and this machine lacks:"
	printf '  %s\n' "${reasons[@]}"
	apt-get update
	# No package's service may start on this machine (FRR's would run a
	# router daemon in its own network namespace): the tests start what
	# they need, in their namespaces.
	norc=""
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		norc=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
	[[ -z $norc ]] || rm -f /usr/sbin/policy-rc.d
	hash -r
	check
	((${#packages[@]} == 0)) || die "still missing after apt-get install: ${reasons[*]}"
fi

export IPCLUSTER_REQUIRE_NETNS=1 IPCLUSTER_REQUIRE_TOOLS=1
set -x
if (($# > 0)); then
	exec go test -race -count=1 -timeout 15m "$@"
fi
go test -race -count=1 -timeout 15m ./...
# The cluster tests again, each cluster on the nftables backend (auto's
# choice where the master lacks CAP_BPF) but those of the tests that name
# their backend (IPCLUSTER_TEST_BACKEND, harness_test.go).
IPCLUSTER_TEST_BACKEND=nftables exec go test -race -count=1 -timeout 15m .
