//go:build linux

package ipcluster

import "github.com/vishvananda/netlink"

// SkipConntrackCleanup makes every master this process starts leave the
// conntrack table alone, so a test can show the flows it would have moved
// staying pinned. Test binaries only.
func SkipConntrackCleanup() {
	deleteConntrack = func(*family, netlink.CustomConntrackFilter) (uint, error) { return 0, nil }
}
